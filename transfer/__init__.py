"""coldferry's disk transfer: the streaming copier and rsync-over-SSH."""

from .digest import file_digest
from .endpoint import Endpoint
from .errors import (ChunkCorrupted, DigestMismatch, HostKeyError, InvalidArgument, NoSpace,
                     PathRefused, TargetExists, TransferError)
from .progress import Progress, ProgressCallback
from .result import CopyResult
from .rsync import rsync_copy
from .sender import DEFAULT_STREAMS, stream_copy

__all__ = [
    "ChunkCorrupted", "CopyResult", "DEFAULT_STREAMS", "DigestMismatch", "Endpoint", "HostKeyError",
    "InvalidArgument", "NoSpace", "PathRefused", "Progress", "ProgressCallback", "TargetExists",
    "TransferError", "file_digest", "rsync_copy", "stream_copy",
]
