"""One copy by the method its options name: the streaming copier or rsync over SSH.

The copiers are imported on first use, so that importing this module (the
receiving side does, through the package) loads no SSH client.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from .endpoint import Endpoint
from .options import CopyOptions
from .progress import ProgressCallback
from .result import CopyResult

if TYPE_CHECKING:
    from .source import Source


def copy(src: str | Source, dest: Endpoint, options: CopyOptions, *, overwrite: bool = False,
         progress: ProgressCallback | None = None,
         sleep: Callable[[float], None] = time.sleep) -> CopyResult:
    """Copy the local file ``src`` to ``dest`` with the copier ``options.method`` names.

    :param src: a path, or (stream method) a ``Source`` the caller opened and closes; rsync
        copies a ``Source`` from its path.
    :param dest: the remote target file and how to reach its host.
    :param options: the method and its settings, validated when they were built.
    :param overwrite: replace an existing target instead of refusing.
    :param progress: called with a Progress as the copy goes on (possibly from other threads).
    :param sleep: waits between reconnect attempts (stream method; injectable for tests).
    :raises TransferError: a subclass naming what failed; the source is never modified.
    """
    if options.method == "rsync":
        from .rsync import rsync_copy
        path = src if isinstance(src, str) else src.path
        return rsync_copy(path, dest, options, overwrite=overwrite, progress=progress)
    from .sender import stream_copy
    return stream_copy(src, dest, options, overwrite=overwrite, progress=progress, sleep=sleep)
