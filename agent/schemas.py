"""The agent API's request and response bodies (docs/api.md, section Agent).

Requests are strict and closed: a string where a number belongs, ``1``
for a boolean, or an unknown key is refused with a 400 naming the field,
rather than guessed at. The conversions to the driver's model objects
live next to the shapes they convert.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any, Iterable, Literal, get_type_hints

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, field_validator

from driver.model import (DiskInfo, FinishOutcome, Flavor, HostResources, Instance, LiveOutcome, MigrateOutcome,
                          Migration, Phase, Vif)
from transfer.progress import Progress
from transfer.endpoint import is_host_address
from transfer.result import CopyResult


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


# -- shared objects ----------------------------------------------------------------

class FlavorBody(_Request):
    name: str
    vcpus: int = Field(ge=0)
    memory_mb: int = Field(ge=0)
    root_gb: int = Field(ge=0)
    ephemeral_gb: int = Field(default=0, ge=0)

    def to_flavor(self) -> Flavor:
        return Flavor(self.name, self.vcpus, self.memory_mb, self.root_gb, self.ephemeral_gb)


class VifBody(_Request):
    address: str
    type: str = "bridge"
    bridge: str = ""
    id: str = ""

    def to_vif(self) -> Vif:
        return Vif(self.address, self.type, self.bridge, self.id)


class MigrationRef(_Request):
    id: str
    source_host: str
    dest_host: str

    def to_migration(self, instance_uuid: str) -> Migration:
        return Migration(id=self.id, instance_uuid=instance_uuid, source_host=self.source_host,
                         dest_host=self.dest_host)


def vifs(network_info: list[VifBody]) -> list[Vif]:
    """The driver's Vifs from a request's network_info."""
    return [v.to_vif() for v in network_info]


# -- requests ------------------------------------------------------------------------

class _JobRequest(_Request):
    """A request that starts a job; the caller may name it, so that asking again is safe."""

    job_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$",
                               description="the caller's name for the job: a start naming a job the agent "
                                           "already has returns that job instead of starting another")


class PowerOnRequest(_JobRequest):
    pass


class PowerOffRequest(_JobRequest):
    timeout: int | None = Field(default=None, ge=0, description="seconds of clean shutdown before forcing")
    retry_interval: int | None = Field(default=None, ge=0, description="seconds between shutdown requests")


def _host_address(text: str) -> str:
    if not is_host_address(text):
        raise ValueError("must be a host name or an IP address (nothing else: no user, port, path or query)")
    return text


HostAddress = Annotated[str, AfterValidator(_host_address)]


class MigrateRequest(PowerOffRequest):
    dest: HostAddress = Field(description="the destination host's data-plane address: a host name or an IP address")
    flavor: FlavorBody | None = Field(default=None, description="the flavor on the destination; "
                                                                 "the current one if omitted")
    network_info: list[VifBody] = []


class FinishMigrationRequest(_JobRequest):
    name: str
    flavor: FlavorBody
    disk_info: str = Field(description="disk_info as migrate-disk-and-power-off returned it")
    migration: MigrationRef
    resize_instance: bool = False
    power_on: bool = True
    network_info: list[VifBody] = []

    @field_validator("disk_info")
    @classmethod
    def _disk_info_parses(cls, text: str) -> str:
        try:
            DiskInfo.loads(text)
        except (ValueError, TypeError) as e:
            raise ValueError(f"not a JSON list of disks ({e})") from None
        return text

    def disks(self) -> list[DiskInfo]:
        return DiskInfo.loads(self.disk_info)


class ConfirmRequest(_JobRequest):
    migration: MigrationRef | None = None


class RevertRequest(_JobRequest):
    migration: MigrationRef | None = None
    power_on: bool = True


class DestroyRequest(_JobRequest):
    destroy_disks: bool = True


class LiveMigrateRequest(_JobRequest):
    dest: HostAddress = Field(description="the destination host's address: a host name or an IP address")


# -- responses -------------------------------------------------------------------------

State = Literal["running", "paused", "shutdown", "crashed", "suspended", "nostate"]


class FlavorOut(_Response):
    name: str
    vcpus: int
    memory_mb: int
    root_gb: int
    ephemeral_gb: int


class InstanceOut(_Response):
    uuid: str
    name: str
    flavor: FlavorOut
    host: str
    power_state: int
    state: State

    @classmethod
    def of(cls, instance: Instance) -> "InstanceOut":
        d = instance.to_dict()
        return cls(**d, state=instance.power_state.name.lower())


class InstancesOut(_Response):
    instances: list[InstanceOut]


# HostResources as the driver reports it, plus the host's data-plane address.
HostOut = create_model("HostOut", __base__=_Response, address=(str, ...),
                       **{name: (hint, ...) for name, hint in get_type_hints(HostResources).items()})


class ProgressOut(_Response):
    file: str
    done: int
    total: int
    rate: float
    eta: float | None
    fraction: float

    @classmethod
    def of(cls, file: str, p: Progress) -> "ProgressOut":
        return cls(file=file, done=p.done, total=p.total, rate=p.rate, eta=p.eta, fraction=p.fraction)


class PhaseOut(_Response):
    """One phase of a migration (driver.model.Phase; PhaseName lists the names): epoch seconds."""

    phase: str
    host: str = Field(default="", description="the host it ran on; empty where that is the host answering")
    start: float
    end: float
    seconds: float
    detail: str = Field(default="", description="e.g. the file a copy phase copied")

    @classmethod
    def of(cls, p: Phase) -> "PhaseOut":
        return cls(**p.to_dict())

    def to_phase(self) -> Phase:
        return Phase(self.phase, self.start, self.end, self.host, self.detail)


def phases_out(phases: Iterable[Phase]) -> list[PhaseOut]:
    return [PhaseOut.of(p) for p in phases]


# -- job results: what a driver call returned, as the agent serializes it and the controller parses it --

# One finished copy: transfer.CopyResult's fields.
CopyOut = create_model("CopyOut", __base__=_Response,
                       **{name: (hint, ...) for name, hint in get_type_hints(CopyResult).items()})


class MigrateResult(_Response):
    """migrate-disk-and-power-off's result (driver.model.MigrateOutcome), totals summed once here."""

    disk_info: str = Field(description="JSON list of the disks as the destination has them (Nova's disk_info)")
    copies: list[CopyOut]
    shared: bool = Field(description="the instance directory is on storage both hosts see: "
                                     "neither side may delete it on a revert or rollback")
    precopy: bool
    was_running: bool
    powered_off_at: float | None
    bytes_before_power_off: int
    bytes_after_power_off: int
    bytes_sent: int
    bytes_skipped: int
    rate: float
    digests: list[str]
    phases: list[PhaseOut] = Field(default=[], description="the driver's phases, as the job shows them")

    @classmethod
    def of(cls, o: MigrateOutcome, phases: Iterable[Phase] = ()) -> "MigrateResult":
        return cls(disk_info=DiskInfo.dumps(o.disk_info), copies=[CopyOut(**asdict(c)) for c in o.copies], shared=o.shared,
                   precopy=o.precopy, was_running=o.was_running, powered_off_at=o.powered_off_at,
                   bytes_before_power_off=o.bytes_before_power_off, bytes_after_power_off=o.bytes_after_power_off,
                   bytes_sent=o.bytes_sent, bytes_skipped=o.bytes_skipped, rate=o.rate, digests=o.digests,
                   phases=phases_out(phases))


class FinishResult(_Response):
    """finish-migration's result (driver.model.FinishOutcome)."""

    running_at: float | None
    phases: list[PhaseOut] = Field(default=[], description="the driver's phases, as the job shows them")

    @classmethod
    def of(cls, o: FinishOutcome, phases: Iterable[Phase] = ()) -> "FinishResult":
        return cls(running_at=o.running_at, phases=phases_out(phases))


class LiveResult(_Response):
    """live-migrate's result (driver.model.LiveOutcome)."""

    downtime_s: float | None
    shared: bool = False
    job_s: float | None = None
    memory_bytes: int | None = None
    prepare_s: float = 0.0
    migration_s: float = 0.0
    flags: list[str] = []
    phases: list[PhaseOut] = Field(default=[], description="the driver's phases, as the job shows them")

    @classmethod
    def of(cls, o: LiveOutcome, phases: Iterable[Phase] = ()) -> "LiveResult":
        return cls(downtime_s=o.downtime_s, shared=o.shared, job_s=o.job_s, memory_bytes=o.memory_bytes,
                   prepare_s=o.prepare_s, migration_s=o.migration_s, flags=list(o.flags), phases=phases_out(phases))


#: The result model of each job operation that has one; the others' result is null.
RESULTS: dict[str, type[_Response]] = {"migrate-disk-and-power-off": MigrateResult,
                                       "finish-migration": FinishResult, "live-migrate": LiveResult}

Outcome = MigrateOutcome | FinishOutcome | LiveOutcome


def dump_result(outcome: Outcome | None, phases: Iterable[Phase] = ()) -> dict[str, Any] | None:
    """A driver call's outcome, with the phases it recorded, as JSON data, the way a job's
    result carries it (None stays None)."""
    if outcome is None:
        return None
    model: _Response
    if isinstance(outcome, MigrateOutcome):
        model = MigrateResult.of(outcome, phases)
    elif isinstance(outcome, FinishOutcome):
        model = FinishResult.of(outcome, phases)
    else:
        model = LiveResult.of(outcome, phases)
    return model.model_dump(mode="json")


def parse_result(op: str, data: Any) -> _Response | None:
    """A job's result as its operation's model (RESULTS); None for an operation without one.

    :raises pydantic.ValidationError: the data does not fit the model.
    """
    model = RESULTS.get(op)
    return None if model is None else model.model_validate(data)


class JobErrorOut(_Response):
    kind: str
    message: str


class JobOut(_Response):
    id: str
    op: str
    instance_uuid: str
    state: Literal["running", "done", "error"]
    progress: ProgressOut | None
    result: Any
    error: JobErrorOut | None
    started_at: str
    ended_at: str | None
    phases: list[PhaseOut] = Field(default=[], description="the phases the job's driver call recorded so far "
                                                            "(a failed job shows where it got to)")


class JobsOut(_Response):
    jobs: list[JobOut]
