"""coldferry's disk transfer: the streaming copier and rsync-over-SSH.

The sending side (``copy``, ``stream_copy``, ``rsync_copy``) is loaded on
first use: the receiving side runs once per copy on the remote host and
should not pay for importing an SSH client it never uses.
"""

from typing import Any

from .digest import file_digest
from .endpoint import Endpoint
from .errors import (ChunkCorrupted, DigestMismatch, HostKeyError, InvalidArgument, NoSpace,
                     PathRefused, TargetExists, TransferError)
from .options import DEFAULT_STREAMS, CopyOptions
from .progress import Progress, ProgressCallback
from .result import CopyResult
from .target import partial_names

__all__ = [
    "ChunkCorrupted", "CopyOptions", "CopyResult", "DEFAULT_STREAMS", "DigestMismatch", "Endpoint",
    "HostKeyError", "InvalidArgument", "NoSpace", "PathRefused", "Progress", "ProgressCallback",
    "TargetExists", "TransferError", "copy", "file_digest", "partial_names", "rsync_copy", "stream_copy",
]

_LAZY = {"copy": "copier", "stream_copy": "sender", "rsync_copy": "rsync"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
