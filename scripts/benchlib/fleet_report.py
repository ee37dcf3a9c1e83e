"""``bench-fleet``'s report: the tables, how each figure grows with the fleet, and the flags."""

from __future__ import annotations

import math
from typing import Any

#: A figure whose log-log slope between two scales is above this grows faster than linearly.
SUPERLINEAR = 1.15
#: Seconds under which a figure is not judged: a few milliseconds double with any other load
#: on the machine, whatever the fleet's size.
NOISE_FLOOR = 0.05


def figures(scale: dict[str, Any]) -> dict[str, float]:
    """The figures of one scale whose growth is judged, by name."""
    out: dict[str, float] = {}
    for n, lists in scale["lists"].items():
        for kind in ("api", "cli"):
            for query, t in lists[kind].items():
                # p50 only: the p99 of a few samples is their largest, which other load decides.
                out[f"{kind} {query}, {n} controller(s), p50"] = t["p50_s"]
    if scale.get("one_migration"):
        out["one migration alone"] = scale["one_migration"]["median_s"]
    for d in scale["drains"]:
        if d["done"]:
            out[f"drain {d['hosts']} hosts, --max-servers {d['max_servers']}, {d['controllers']} controller(s)"] = \
                projected(d)
    return out


def projected(d: dict[str, Any]) -> float:
    """A drain run's time for all its rows: measured when it finished, else extrapolated from the
    rows done by the timeout."""
    return d["elapsed_s"] if d["complete"] else d["elapsed_s"] * d["migrations"] / d["done"]


def growth(scales: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For every figure present at two or more scales: its values and the log-log slope between
    consecutive scales (1: grows as the fleet, 2: as its square; the ideal drain grows as the
    servers per drained host, so linearly too)."""
    by_figure: dict[str, list[tuple[int, float]]] = {}
    for scale in sorted(scales, key=lambda s: s["servers"]):
        for name, value in figures(scale).items():
            by_figure.setdefault(name, []).append((scale["servers"], value))
    out = {}
    for name, points in by_figure.items():
        if len(points) < 2:
            continue
        slopes = [math.log(v2 / v1) / math.log(s2 / s1) if v1 > 0 and v2 > 0 else None
                  for (s1, v1), (s2, v2) in zip(points, points[1:])]
        judged = [x for x, (_, v2) in zip(slopes, points[1:]) if x is not None and v2 >= NOISE_FLOOR]
        out[name] = {"servers": [s for s, _ in points], "values": [v for _, v in points], "slopes": slopes,
                     "superlinear": any(x > SUPERLINEAR for x in judged)}
    return out


def _pp(t: dict[str, Any] | None) -> str:
    return "-" if t is None else f"{t['p50_s']:.3f} / {t['p99_s']:.3f}"


def _slopes(g: dict[str, Any] | None) -> str:
    if g is None:
        return "-"
    text = " → ".join("?" if s is None else f"{s:.2f}" for s in g["slopes"])
    return f"**{text}** ⚠" if g["superlinear"] else text


def render(meta: dict[str, Any], scales: list[dict[str, Any]], notes: list[str] | None = None) -> str:
    """The markdown report."""
    scales = sorted(scales, key=lambda s: s["servers"])
    g = growth(scales)
    head = [f"{s['servers']:,} servers" for s in scales]
    lines = [f"# coldferry fleet benchmark, {meta['stamp']}", "",
             f"- {meta['machine']}; PostgreSQL {meta['postgres']} (private cluster, Unix socket, fsync off)",
             f"- {meta['hosts']} in-memory hosts behind real agent apps in one process (uvicorn on loopback, "
             "routed by path), real `coldferry controller` processes on one database, plain HTTP on loopback; "
             "controller settings at their defaults (poll_interval 1 s, lease 60 s)",
             f"- every server running, flavor 1 vCPU / 512 MB / 1 GB; one disk copy takes "
             f"{meta['migration_seconds']:g} s (the memory driver's step delay)",
             f"- migration records present: {', '.join(format(s['records'], ',') for s in scales)} "
             "(final statuses, a day of history), plus the benchmark's own",
             f"- latencies: p50 / p99 in seconds, nearest rank, {meta['samples']} API samples after a warm-up "
             f"and {meta['cli_samples']} CLI runs per list (p99 of so few samples is their largest); with two "
             "controllers the requests alternate between them; CLI: the default table output to a pipe",
             f"- drains: {meta['drain_hosts']} hosts at once (disabled first, so no drain fills another), "
             "cold migrations; ideal = ceil(servers per host / max-servers) × one migration alone",
             "- growth: log-log slope between consecutive scales (1.0 linear, 2.0 quadratic); "
             f"above {SUPERLINEAR} is flagged ⚠ when the larger figure is {NOISE_FLOOR} s or more", ""]
    for n in sorted({n for s in scales for n in s["lists"]}):
        for kind, title in (("api", "API"), ("cli", "CLI (`coldferry ...`)")):
            lines += [f"## {title}, {n} controller(s): p50 / p99 s", "",
                      "| list | " + " | ".join(head) + " | rows | growth |",
                      "|---|" + "---|" * len(scales) + "---|---|"]
            names = [q for q in scales[0]["lists"].get(n, {}).get(kind, {})]
            for q in names:
                cells = [_pp(s["lists"].get(n, {}).get(kind, {}).get(q)) for s in scales]
                rows = "/".join(str(s["lists"][n][kind][q].get("rows", s["lists"][n][kind][q].get("lines", "")))
                                for s in scales if q in s["lists"].get(n, {}).get(kind, {}))
                lines.append(f"| {q} | " + " | ".join(cells) + f" | {rows} | "
                             f"{_slopes(g.get(f'{kind} {q}, {n} controller(s), p50'))} |")
            lines.append("")
    lines += ["## One migration alone (request to finished, median)", "",
              "| | " + " | ".join(head) + " | growth |", "|---|" + "---|" * len(scales) + "---|",
              "| seconds | " + " | ".join(f"{s['one_migration']['median_s']:.2f}" if s.get("one_migration") else "-"
                                        for s in scales) + f" | {_slopes(g.get('one migration alone'))} |", ""]
    lines += ["## Drains: elapsed s (ideal s, × ideal), migrations per minute", "",
              "A run not done by --drain-timeout shows ~ its time projected from the rows done (done/all "
              "in the seconds followed); growth is judged on those times.", "",
              "| controllers | --max-servers | " + " | ".join(head) + " | growth |",
              "|---|---|" + "---|" * len(scales) + "---|"]
    keys = sorted({(d["controllers"], d["max_servers"]) for s in scales for d in s["drains"]})
    for n, k in keys:
        cells = []
        for s in scales:
            d = next((d for d in s["drains"] if (d["controllers"], d["max_servers"]) == (n, k)), None)
            cells.append("-" if d is None else _drain_cell(d))
        hosts = next(d["hosts"] for s in scales for d in s["drains"])
        name = f"drain {hosts} hosts, --max-servers {k}, {n} controller(s)"
        lines.append(f"| {n} | {k} | " + " | ".join(cells) + f" | {_slopes(g.get(name))} |")
    flagged = [name for name, x in g.items() if x["superlinear"]]
    lines += ["", "## Faster than linear", ""]
    lines += [f"- {name}: " + ", ".join(f"{v:.3f} s" for v in g[name]["values"]) + " at "
              + ", ".join(f"{s:,}" for s in g[name]["servers"]) + " servers" for name in flagged] or ["- none"]
    problems = [f"- {s['servers']:,} servers, {d['controllers']} controller(s), --max-servers {d['max_servers']}: "
                + "; ".join(([] if d["complete"] else [f"not done after {d['elapsed_s']:.0f} s "
                                                        f"({d['done']} of {d['migrations']} rows done)"])
                            + d["drain_errors"] + d["row_errors"])
                for s in scales for d in s["drains"] if not d["complete"] or d["errors"] or d["drain_errors"]]
    if problems:
        lines += ["", "## Drains that did not end cleanly", ""] + problems
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def _drain_cell(d: dict[str, Any]) -> str:
    ideal = d.get("ideal_s")
    rate = 60 * d["done"] / d["elapsed_s"] if d["elapsed_s"] else 0
    if d["complete"]:
        text = f"{d['elapsed_s']:.1f}"
    elif d["done"]:
        text = f"~{projected(d):.0f} ({d['done']}/{d['migrations']} done in {d['elapsed_s']:.0f})"
    else:
        text = f"none done in {d['elapsed_s']:.0f}"
    if ideal and d["done"]:
        text += f" ({ideal:.1f}, {projected(d) / ideal:.1f}×)"
    return text + f", {rate:.0f}/min"
