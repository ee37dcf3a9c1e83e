"""Sizes and rates: parsing what operators type and formatting what we print."""

from __future__ import annotations

import os
import re

from .errors import InvalidArgument

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_SUFFIX = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*(?:/s)?\s*$", re.I)


def parse_size(text: str, what: str = "size") -> int:
    """Parse ``"512"``, ``"4M"``, ``"1.5GiB"``, ``"100M/s"`` into bytes (binary units)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise InvalidArgument(what=what, value=text,
                              reason="use a number with an optional K, M, G or T suffix, e.g. 100M")
    value = int(float(m.group(1)) * _SUFFIX[m.group(2).lower()])
    if value <= 0:
        raise InvalidArgument(what=what, value=text, reason="must be greater than zero")
    return value


def format_size(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def available_memory() -> int:
    """Bytes of memory the kernel could give without swapping (MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * KiB
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
