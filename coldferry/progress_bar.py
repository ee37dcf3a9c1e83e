"""A rich progress bar fed by transfer's progress callback."""

from __future__ import annotations

import contextlib
from typing import Iterator

from transfer.progress import Progress, ProgressCallback


@contextlib.contextmanager
def progress_bar(enabled: bool, label: str) -> Iterator[ProgressCallback | None]:
    """Yield a callback that draws a bar on standard error, or None when disabled."""
    if not enabled:
        yield None
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress as Bar, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)
    with Bar(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
             TransferSpeedColumn(), TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(p: Progress) -> None:
            bar.update(task, completed=p.done, total=p.total)

        yield update
