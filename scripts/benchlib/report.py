"""Tables for the terminal and markdown, and the JSON record."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from .results import RESUME_LIMIT, CaseResult, ResumeCheck, TargetCheck, ToolResult

MiB = 1 << 20
SYNC_TEXT = {"file": "`sync TARGET DIR` (fsync of the target file and its directory)",
             "fs": "`sync -f TARGET` (syncfs of the target's whole file system)"}
HEADER = ("tool", "durable s", "min-max", "delivered s", "MiB/s apparent", "MiB/s data",
          "vs stream", "target alloc MiB", "verified")


def relative(seconds: float | None, base: float | None) -> str:
    """How many times slower (or faster) than the baseline: "2.31× slower"."""
    if seconds is None or base is None:
        return "n/a"
    ratio = seconds / base
    if abs(ratio - 1.0) < 0.005:
        return "1.00×"
    return f"{ratio:.2f}× slower" if ratio > 1 else f"{1 / ratio:.2f}× faster"


def row(case: CaseResult, result: ToolResult, base: float | None) -> tuple[str, ...]:
    """One tool's line: durable median and spread, delivered median, rates of the durable time."""
    if result.unavailable:
        return (result.label, *("-",) * (len(HEADER) - 2), "not run *")
    m, spread, delivered = result.median, result.spread, result.delivered_median
    full = " FULL" if case.fully_allocated(result) else ""
    return (result.label,
            f"{m:.2f}" if m else "n/a",
            f"{spread[0]:.2f}-{spread[1]:.2f}" if spread else "n/a",
            f"{delivered:.2f}" if delivered else "n/a",
            f"{case.source.size / MiB / m:.1f}" if m else "n/a",
            f"{case.source.data / MiB / m:.1f}" if m else "n/a",
            relative(m, base),
            f"{result.allocated / MiB:.1f}{full}" if result.runs else "-",
            result.verdict())


def case_heading(case: CaseResult) -> str:
    s = case.source
    return (f"case ({s.case.key}) {s.case.title}: {s.path.name}, {s.size / MiB:.0f} MiB apparent, "
            f"{s.data / MiB:.0f} MiB data, {s.allocated / MiB:.0f} MiB allocated, "
            f"{s.extents} data run(s) -- {s.case.layout}")


def case_rows(case: CaseResult, baseline: str) -> list[tuple[str, ...]]:
    base = case.get(baseline)
    base_median = base.median if base else None
    return [row(case, r, base_median) for r in case.tools]


def unavailable_notes(case: CaseResult) -> list[str]:
    return [f"* {r.label}: {r.status}" for r in case.tools if r.unavailable]


def text_table(rows: list[tuple[str, ...]], header: tuple[str, ...] = HEADER) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def md_table(rows: list[tuple[str, ...]], header: tuple[str, ...] = HEADER) -> str:
    esc = lambda c: c.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def target_lines(checks: list[TargetCheck], resume: ResumeCheck | None) -> list[str]:
    lines = []
    for c in checks:
        if c.ratio is None:
            lines.append(f"n/a   {c.target.text} (not measured: {c.verdict.removeprefix('n/a: ')})")
        else:
            word, _, why = c.verdict.partition(" ")
            if c.target.need < 1:
                measured = (f"coldferry takes {1 / c.ratio:.2f}× the time of {c.target.other}, "
                            f"at most {1 / c.target.need:.2g}×")
            else:
                measured = f"measured {c.ratio:.2f}×, need {c.target.need:g}×"
            lines.append(f"{word:<4}  {c.target.text} ({measured}){' ' + why if why else ''}")
    if resume is not None:
        frac = f"{resume.fraction:.0%} of the data sent" if resume.fraction is not None else "not measured"
        tail = f"; {resume.note}" if resume.note else ""
        lines.append(f"{resume.verdict.split(':')[0]:<4}  resume: second run of an interrupted stream "
                     f"copy sends <= {RESUME_LIMIT:.0%} ({frac}){tail}")
    return lines


def resume_lines(resume: ResumeCheck) -> list[str]:
    lines = []
    if resume.killed_at_seconds is not None:
        lines.append(f"first run killed (SIGKILL) after {resume.killed_at_seconds:.2f} s with "
                     f"{(resume.killed_at_allocated or 0) / MiB:.0f} MiB of {(resume.data or 0) / MiB:.0f} "
                     f"MiB allocated on the target")
    if resume.second_summary:
        lines.append(f"second run: {resume.second_summary}")
        lines.append(f"result verified: {'ok' if resume.verified else 'FAIL'}")
    return lines


def summary_rows(cases: list[CaseResult]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """One line per case, one cell per tool: "durable s (delivered s)", medians."""
    labels = [r.label for r in cases[0].tools] if cases else []
    header = ("case", *labels)
    rows = []
    for case in cases:
        cells = []
        for r in case.tools:
            m, d = r.median, r.delivered_median
            cells.append(f"{m:.2f} s ({d:.2f} s)" if m and d else "-")
        rows.append((f"{case.source.case.key}: {case.source.case.title}", *cells))
    return header, rows


def render_text(meta: dict[str, Any], cases: list[CaseResult], baseline: str,
                checks: list[TargetCheck], resume: ResumeCheck | None) -> str:
    out = [f"coldferry transfer benchmark, {meta['timestamp']}", *notes(meta), ""]
    for case in cases:
        out += [case_heading(case), text_table(case_rows(case, baseline)), *unavailable_notes(case), ""]
    if resume is not None:
        out += ["resume check (case a, coldferry stream direct):", *("  " + ln for ln in resume_lines(resume)), ""]
    header, rows = summary_rows(cases)
    out += ["medians, durable s (delivered s):", text_table(rows, header), ""]
    out += ["targets:", *("  " + ln for ln in target_lines(checks, resume))]
    return "\n".join(out)


def render_markdown(meta: dict[str, Any], cases: list[CaseResult], baseline: str,
                    checks: list[TargetCheck], resume: ResumeCheck | None) -> str:
    out = [f"# coldferry transfer benchmark, {meta['timestamp']}", "", *("- " + n for n in notes(meta)), ""]
    header, rows = summary_rows(cases)
    out += ["## medians, durable s (delivered s)", "", md_table(rows, header), ""]
    for case in cases:
        out += [f"## {case_heading(case)}", "", md_table(case_rows(case, baseline)), "",
                *(n + "  " for n in unavailable_notes(case)), ""]
    if resume is not None:
        out += ["## resume check", "", *("- " + ln for ln in resume_lines(resume)), ""]
    out += ["## targets", "", *("- " + ln for ln in target_lines(checks, resume)), ""]
    return "\n".join(out)


def notes(meta: dict[str, Any]) -> list[str]:
    s = meta["settings"]
    return [
        f"median of {s['runs']} run(s) per tool after {s['warmups']} uncounted warm-up run(s); "
        f"scale {s['scale']:g}" + ("" if s["scale"] == 1 else " (targets are defined at scale 1)"),
        "page cache: " + ("written back and dropped before every run" if s["drop_caches"]
                          else f"written back before every run, NOT dropped ({s['drop_caches_note']})"),
        "durable s: from starting the copier until its target is durable: the copier's run, then "
        + SYNC_TEXT[s.get("sync", "file")] + " as soon as it exits (for nbdcopy while qemu-nbd still "
        "runs); every time compared (vs stream, MiB/s, targets) is this one. min-max: its spread. "
        "delivered s: to the copier's exit only, the data possibly still in the page cache. "
        "coldferry runs with --fsync, as migrations do (the agent's transfer_fsync): its receiver "
        "writes block-aligned data with O_DIRECT and fdatasyncs the file before it renames it into "
        "place and fsyncs the directory, so its delivered time already includes making the data "
        "durable. qemu-nbd start and target truncate are not timed",
        f"OpenSSH cipher {s['cipher']} for ssh, scp and rsync -e ssh, all with strict host-key "
        "checking; coldferry picks its own: AES-128-GCM sealed frames over TCP for stream/direct, "
        "TLS 1.2 (AES-128-GCM) for stream/tls, paramiko's choice "
        "(aes128-ctr) for stream/ssh, OpenSSH's default for coldferry rsync; nbdcopy runs over "
        "plain TCP to qemu-nbd, unencrypted",
        "MiB/s data = non-zero data (64 KiB grains) per second; FULL = target fully allocated "
        "though the source's data is not",
        f"machine: {meta['machine']}",
        "versions: " + "; ".join(v if v.lower().startswith(k) else f"{k} {v}"
                                 for k, v in meta["versions"].items()),
    ]


def to_json(meta: dict[str, Any], cases: list[CaseResult], checks: list[TargetCheck],
            resume: ResumeCheck | None) -> str:
    def case_json(c: CaseResult) -> dict[str, Any]:
        s = c.source
        return {
            "case": s.case.key, "title": s.case.title, "layout": s.case.layout,
            "source": {"name": s.path.name, "size": s.size, "data": s.data, "allocated": s.allocated,
                       "runs": s.extents, "digest": c.source_digest},
            "results": [{
                "tool": r.tool, "label": r.label, "status": r.status, "median_seconds": r.median,
                "median_delivered_seconds": r.delivered_median, "median_sync_seconds": r.sync_median,
                "spread_seconds": r.spread,
                "verified": r.verified, "allocated": r.allocated,
                "fully_allocated": c.fully_allocated(r),
                "warmup": dataclasses.asdict(r.warmup) if r.warmup else None,
                "runs": [{**dataclasses.asdict(run), "durable_seconds": run.durable_seconds}
                         for run in r.runs],
            } for r in c.tools],
        }
    doc = {
        **meta,
        "cases": [case_json(c) for c in cases],
        "targets": [{"text": t.target.text, "case": t.target.case, "against": t.target.other,
                     "need": t.target.need, "ratio": t.ratio, "verdict": t.verdict} for t in checks],
        "resume": ({**dataclasses.asdict(resume), "fraction": resume.fraction, "limit": RESUME_LIMIT}
                   if resume else None),
    }
    return json.dumps(doc, indent=2, default=str)


def write_files(out_dir: Path, stamp: str, text_json: str, markdown: str) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out_dir / f"transfer-{stamp}.json", out_dir / f"transfer-{stamp}.md"
    jpath.write_text(text_json + "\n")
    mpath.write_text(markdown)
    return jpath, mpath
