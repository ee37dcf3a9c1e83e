"""What a finished copy reports."""

from __future__ import annotations

from dataclasses import dataclass

from .units import MiB, format_size


@dataclass(frozen=True)
class CopyResult:
    """Figures of one finished copy.

    ``size`` is the file's apparent size; ``sent`` the data bytes that had
    to cross the wire in this run (before compression); ``wire`` the bytes
    actually sent after compression; ``skipped`` the bytes never sent
    because they are holes or zero runs; ``resumed`` the data bytes already
    present on the target from an earlier, interrupted run.
    """

    method: str
    size: int
    sent: int
    wire: int
    skipped: int
    resumed: int
    seconds: float
    digest: str

    @property
    def rate(self) -> float:
        """Data bytes per second this run (sent / seconds)."""
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        extra = f", {format_size(self.resumed)} already there" if self.resumed else ""
        wire = f" ({format_size(self.wire)} on the wire)" if self.wire != self.sent else ""
        return (f"{self.method}: sent {format_size(self.sent)}{wire}, skipped "
                f"{format_size(self.skipped)} of holes/zeros{extra}, in {self.seconds:.2f} s "
                f"({self.rate / MiB:.1f} MiB/s), digest {self.digest}")
