"""How one copy is made: the settings every copier takes, checked once when they are built."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from .errors import InvalidArgument
from .units import KiB

METHODS = ("stream", "rsync")
#: direct: plain TCP with AES-GCM sealed frames (fastest); tls: a TLS connection; ssh: inside SSH.
CHANNELS = ("direct", "tls", "ssh")
COMPRESS_MODES = ("off", "fast", "auto")
MAX_STREAMS = 16
#: Two streams keep both cores busy on a two-core host (measured, see README).
DEFAULT_STREAMS = 2
#: A field's type from its annotation, a string under ``from __future__ import annotations``.
_TYPES: dict[Any, type] = {"str": str, "int": int, "bool": bool, str: str, int: int, bool: bool}


@dataclass(frozen=True)
class CopyOptions:
    """One copy's settings; a bad value is refused here, before any copy starts.

    :param method: ``stream`` (coldferry's streaming copier) or ``rsync`` (rsync over OpenSSH).
    :param streams: parallel data streams of the stream method, 1 to 16.
    :param channel: the stream method's data channel: ``direct``, ``tls`` or ``ssh``.
    :param compress: the stream method's per-chunk compression: ``off``, ``fast`` or ``auto``.
    :param bwlimit: bytes per second over all streams; 0 for no limit (rsync: at least 1 KiB/s).
    :param retries: reconnect-and-resume attempts after a dropped connection (stream method).
    :param fsync: the receiver flushes the file to disk before it reports success (stream method).
    :raises InvalidArgument: naming the field (``what``) and the values it takes.
    """

    method: str = "stream"
    streams: int = DEFAULT_STREAMS
    channel: str = "direct"
    compress: str = "off"
    bwlimit: int = 0
    retries: int = 3
    fsync: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value, kind = getattr(self, f.name), _TYPES[f.type]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise InvalidArgument(what=f.name, value=value, reason=f"expected {f.type}")
        checks = [
            ("method", self.method in METHODS, f"use {' or '.join(METHODS)}"),
            ("streams", 1 <= self.streams <= MAX_STREAMS, f"use 1 to {MAX_STREAMS}"),
            ("channel", self.channel in CHANNELS, f"use {', '.join(CHANNELS)}"),
            ("compress", self.compress in COMPRESS_MODES, f"use {', '.join(COMPRESS_MODES)}"),
            ("bwlimit", self.bwlimit >= 0, "bytes per second, 0 for no limit"),
            ("bwlimit", not (self.method == "rsync" and 0 < self.bwlimit < KiB),
             "rsync limits in KiB/s: give at least 1024 bytes per second"),
            ("retries", self.retries >= 0, "0 or more reconnect attempts"),
        ]
        for name, ok, reason in checks:
            if not ok:
                raise InvalidArgument(what=name, value=getattr(self, name), reason=reason)

    @classmethod
    def named(cls, prefix: str, **values: Any) -> CopyOptions:
        """Build from ``values``; a refused one is named ``<prefix><field>`` (``--streams``).

        :raises InvalidArgument: with ``what`` the prefixed name.
        """
        try:
            return cls(**values)
        except InvalidArgument as e:
            raise InvalidArgument(what=prefix + e.what, value=e.value, reason=e.reason) from None

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], prefix: str = "") -> CopyOptions:
        """Build from settings named ``<prefix><field>`` (``transfer_streams``); others are ignored.

        :raises InvalidArgument: with ``what`` the setting's full name.
        """
        return cls.named(prefix, **{f.name: settings[prefix + f.name] for f in fields(cls)
                                    if prefix + f.name in settings})

    def require(self, method: str) -> None:
        """Refuse these options in a copier of another ``method`` than theirs.

        :raises InvalidArgument: naming ``method``.
        """
        if self.method != method:
            raise InvalidArgument(what="method", value=self.method,
                                  reason=f"this is the {method} copier; transfer.copy picks the copier by method")
