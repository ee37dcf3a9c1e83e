"""What the benchmark found: per tool, per case, the targets and the resume check."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from .images import Source
from .measure import Run

MiB = 1 << 20


@dataclass
class ToolResult:
    """All runs of one tool on one case. ``unavailable`` says why it did not run."""

    tool: str
    label: str
    runs: list[Run] = field(default_factory=list)
    warmup: Run | None = None
    unavailable: str | None = None

    @property
    def timed(self) -> list[float]:
        """Durable times (copier and sync) of the runs without an error."""
        return [r.durable_seconds for r in self.runs if r.error is None and r.durable_seconds is not None]

    @property
    def median(self) -> float | None:
        """The median durable time: the one compared."""
        return statistics.median(self.timed) if self.timed else None

    @property
    def spread(self) -> tuple[float, float] | None:
        """The fastest and slowest durable time."""
        return (min(self.timed), max(self.timed)) if self.timed else None

    @property
    def delivered_median(self) -> float | None:
        """The median time to the copier's exit, the data possibly still in the page cache."""
        times = [r.seconds for r in self.runs if r.error is None and r.seconds is not None]
        return statistics.median(times) if times else None

    @property
    def sync_median(self) -> float | None:
        times = [r.sync_seconds for r in self.runs if r.error is None and r.sync_seconds is not None]
        return statistics.median(times) if times else None

    @property
    def verified(self) -> bool:
        return bool(self.runs) and all(r.verified for r in self.runs)

    @property
    def allocated(self) -> int:
        return max((r.allocated for r in self.runs), default=0)

    @property
    def status(self) -> str:
        if self.unavailable:
            return f"not available: {self.unavailable}"
        errors = [r.error for r in self.runs if r.error]
        if errors:
            return f"FAIL: {errors[0]}"
        if not self.verified:
            return "FAIL: result differs from the source"
        return "ok"

    def verdict(self) -> str:
        """The table's "verified" cell."""
        if self.unavailable or not self.runs:
            return "-"
        if any(r.error for r in self.runs):
            return "FAIL (error)"
        if not all(r.cmp_ok for r in self.runs):
            return "FAIL (cmp)"
        if any(r.digest_ok is False for r in self.runs):
            return "FAIL (digest)"
        if any(r.digest_ok is None for r in self.runs):
            return "ok (cmp only)"
        return "ok"


@dataclass
class CaseResult:
    source: Source
    source_digest: str | None
    tools: list[ToolResult]

    def get(self, tool: str) -> ToolResult | None:
        return next((t for t in self.tools if t.tool == tool), None)

    def fully_allocated(self, result: ToolResult) -> bool:
        """The target is (nearly) fully allocated although most of the source need not be."""
        size = self.source.size
        return bool(result.runs) and result.allocated >= 0.95 * size and self.source.data < 0.9 * size


@dataclass(frozen=True)
class Target:
    """Coldferry stream (direct channel) must be ``need`` times as fast as ``other`` on ``case``,
    durable for durable; a ``need`` below 1 allows it to be that much slower (1/1.3: within
    1.3x of ``other``)."""

    case: str
    other: str
    need: float
    text: str


@dataclass
class TargetCheck:
    target: Target
    ratio: float | None
    verdict: str          # PASS, MISS, or "n/a: why"


CP_WITHIN = 1.3
TARGETS = (
    Target("a", "rsync", 1.6, "dense 2 GiB: coldferry stream >= 1.6x the speed of rsync over SSH"),
    Target("b", "rsync", 15.0, "sparse 8 GiB / 1 GiB data: coldferry stream >= 15x rsync --sparse"),
    Target("c", "rsync", 10.0, "75% zeros 4 GiB: coldferry stream >= 10x rsync"),
    *(Target(case, "nbdcopy", 1.0, f"{title}: coldferry stream ahead of nbdcopy")
      for case, title in (("a", "dense 2 GiB"), ("b", "sparse 8 GiB / 1 GiB data"),
                          ("c", "75% zeros 4 GiB"), ("d", "qcow2 513 MiB"))),
    *(Target(case, "cp", 1 / CP_WITHIN, f"{title}: coldferry stream within {CP_WITHIN}x of local cp + sync")
      for case, title in (("a", "dense 2 GiB"), ("b", "sparse 8 GiB / 1 GiB data"),
                          ("c", "75% zeros 4 GiB"), ("d", "qcow2 513 MiB"))),
)
RESUME_LIMIT = 0.55


@dataclass
class ResumeCheck:
    """An interrupted stream copy of case a, rerun: how much the second run sent."""

    killed_at_seconds: float | None = None
    killed_at_allocated: int | None = None
    first_summary: str = ""
    second_summary: str = ""
    sent: int | None = None
    already_there: int | None = None
    data: int | None = None
    verified: bool = False
    verdict: str = "n/a"
    note: str = ""

    @property
    def fraction(self) -> float | None:
        return self.sent / self.data if self.sent is not None and self.data else None


def check_targets(cases: dict[str, CaseResult], baseline: str) -> list[TargetCheck]:
    checks = []
    for target in TARGETS:
        case = cases.get(target.case)
        if case is None:
            checks.append(TargetCheck(target, None, f"n/a: case {target.case} not run"))
            continue
        ours, theirs = case.get(baseline), case.get(target.other)
        missing = [r.tool if r else name for r, name in ((ours, baseline), (theirs, target.other))
                   if r is None or r.median is None]
        if missing:
            checks.append(TargetCheck(target, None, f"n/a: no time for {', '.join(missing)}"))
            continue
        ratio = theirs.median / ours.median
        if not (ours.verified and theirs.verified):
            verdict = "MISS (a result failed verification)"
        else:
            verdict = "PASS" if ratio >= target.need else "MISS"
        checks.append(TargetCheck(target, ratio, verdict))
    return checks
