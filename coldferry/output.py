"""Printing API objects: rich tables for people, JSON for scripts (``-f json``).

A list prints as a table with chosen columns; one object as a two-column
Field/Value table. JSON output is the controller's objects unchanged (all
fields, the API's names), so scripts rely on docs/api.md, not on our columns.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from driver.model import Phase, copy_seconds, total_seconds
from transfer.units import format_size

FORMATS = ("table", "json")
Row = Mapping[str, Any]


@dataclass(frozen=True)
class Column:
    """A table column: its header and the row's key, or a function of the row."""

    header: str
    get: str | Callable[[Row], Any]

    def value(self, row: Row) -> Any:
        return row.get(self.get) if isinstance(self.get, str) else self.get(row)


def format_option() -> argparse.ArgumentParser:
    """A parent parser with ``-f {table,json}``."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-f", "--format", choices=FORMATS, default="table",
                   help="output format: a table for people, the API's JSON for scripts (default: %(default)s)")
    return p


def cell(value: Any) -> str:
    """One value as table text: nothing for null, key=value pairs for an object, a line per list item."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return ", ".join(f"{k}={cell(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "\n".join(cell(v) for v in value)
    return str(value)


def console() -> Console:
    """Standard output; a pipe or file gets whole lines to grep, not a table folded at 80 columns."""
    out = Console(highlight=False)
    return out if out.is_terminal else Console(highlight=False, width=1000)


def build_table(rows: Sequence[Row], columns: Sequence[Column], title: str | None = None) -> Table:
    table = Table(*(c.header for c in columns), title=title)
    for row in rows:
        # Text, not markup: "[Errno 111]" in an error must print as it is.
        table.add_row(*(Text(cell(c.value(row))) for c in columns))
    return table


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2))


def print_list(rows: Sequence[Row], columns: Sequence[Column], fmt: str) -> None:
    if fmt == "json":
        print_json(list(rows))
    else:
        console().print(build_table(rows, columns))


def record_table(record: Row, shown: Mapping[str, Callable[[Any], Any]] | None = None) -> Table:
    """Field/Value rows in the record's order; ``shown`` maps a field to a friendlier rendering."""
    shown = shown or {}
    table = Table("Field", "Value")
    for key, value in record.items():
        table.add_row(Text(key), Text(cell(shown[key](value) if key in shown else value)))
    return table


def print_record(record: Row, fmt: str, shown: Mapping[str, Callable[[Any], Any]] | None = None) -> None:
    if fmt == "json":
        print_json(record)
    else:
        console().print(record_table(record, shown))


def format_eta(seconds: float | None) -> str:
    """``3725`` -> ``"1:02:05"``, ``65`` -> ``"1:05"``; unknown -> ``"?"``."""
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def percent(progress: Row | None) -> str:
    if not progress:
        return ""
    return f"{100 * float(progress.get('fraction') or 0):.0f}%"


def describe_progress(progress: Row | None) -> str:
    """A copy's progress in one line: file, bytes done of total, rate, time left."""
    if not progress:
        return ""
    return (f"{progress.get('file', '')} {format_size(progress.get('done', 0))} of "
            f"{format_size(progress.get('total', 0))} ({percent(progress)}) at "
            f"{format_size(progress.get('rate') or 0)}/s, eta {format_eta(progress.get('eta'))}")


def phases(timeline: Sequence[Row] | None) -> list[Phase]:
    """A record's ``timeline`` (the API's phase objects) as Phases."""
    return [Phase.from_dict(p) for p in timeline or ()]


def describe_timeline(timeline: Sequence[Row] | None) -> str:
    """A timeline in one line: how many phases, the time from the first start to the last end,
    and the share of it spent copying."""
    ps = phases(timeline)
    if not ps:
        return ""
    total = total_seconds(ps)
    return f"{len(ps)} phases over {total:.3f} s, copying {copy_share(ps)}"


def copy_share(ps: Sequence[Phase]) -> str:
    """``0.512 s (12%)``: the seconds of the copy phases and their share of the whole timeline."""
    total, copying = total_seconds(ps), copy_seconds(ps)
    return f"{copying:.3f} s ({100 * copying / total:.0f}%)" if total > 0 else f"{copying:.3f} s"


def timeline_table(timeline: Sequence[Row]) -> Table:
    """One row per phase, in the order recorded: where it ran, when it started (seconds after
    the first phase's start) and how long it took; the caption gives the total and the copy share."""
    ps = phases(timeline)
    first = min((p.start for p in ps), default=0.0)
    began = dt.datetime.fromtimestamp(first, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    table = Table("Phase", "Host", "Detail", "Start", "Seconds", title=f"Timeline from {began} UTC",
                  caption=f"total {total_seconds(ps):.3f} s; copying {copy_share(ps)}")
    for p in ps:
        table.add_row(Text(p.name), Text(p.host or "(controller)"), Text(p.detail), f"+{p.start - first:.3f}",
                      f"{p.seconds:.3f}")
    return table


def print_timeline(timeline: Sequence[Row] | None) -> None:
    """The timeline as a table, below a record; nothing when no phase was recorded."""
    if timeline:
        console().print(timeline_table(timeline))


def note(line: str) -> None:
    """A line for the operator on standard error, keeping standard output for results."""
    print(line, file=sys.stderr)


def fail(message: str) -> int:
    """Print an error the way argparse does and return the exit status for it."""
    print(f"coldferry: error: {message}", file=sys.stderr)
    return 1


def on_change(describe: Callable[[Row], str], say: Callable[[str], None] = note) -> Callable[[Row], None]:
    """A callback for polled objects that says ``describe(obj)`` whenever that line changes."""
    last: list[str] = []

    def report(obj: Row) -> None:
        line = describe(obj)
        if not last or last[-1] != line:
            last[:] = [line]
            say(line)

    return report
