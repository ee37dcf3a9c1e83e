"""How the dashboard writes sizes, shares and times: the templates' filters."""

from __future__ import annotations

from typing import Any

from driver.model import Phase, copy_seconds, total_seconds

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number at 1 or more: ``1.5 GiB``."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" or value >= 100 else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def mib(n: float) -> str:
    """A size given in MiB (an agent's memory_mb)."""
    return size(n * 1024 ** 2)


def gib(n: float) -> str:
    """A size given in GiB (an agent's disk_gb)."""
    return size(n * 1024 ** 3)


def share(used: float, total: float) -> float:
    """``used`` as a fraction of ``total`` for a <meter>; 0 when the total is unknown."""
    return min(max(used / total, 0.0), 1.0) if total > 0 else 0.0


def percent(fraction: float | None) -> str:
    return "" if fraction is None else f"{fraction * 100:.0f}%"


def when(iso: str | None) -> str:
    """An API time (``2026-11-23T11:40:00Z``) as ``2026-11-23 11:40:00``: the zone is always UTC."""
    return "" if not iso else iso.replace("T", " ").rstrip("Z")


def seconds(s: float) -> str:
    """A duration to the millisecond: ``1.234 s``."""
    return f"{s:.3f} s"


def timeline(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """A record's timeline (the API's phases) for its table: each phase with its start as
    seconds after the first phase's start, the total, and the time and share spent copying."""
    ps = [Phase.from_dict(p) for p in phases]
    first = min((p.start for p in ps), default=0.0)
    total, copying = total_seconds(ps), copy_seconds(ps)
    return {"rows": [{"phase": p.name, "host": p.host, "detail": p.detail, "offset": p.start - first,
                      "seconds": p.seconds} for p in ps],
            "total": total, "copying": copying, "copy_share": copying / total if total > 0 else None}


FILTERS = {"size": size, "mib": mib, "gib": gib, "share": share, "percent": percent, "when": when,
           "seconds": seconds, "timeline": timeline}
