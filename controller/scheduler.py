"""Which host may take a server: Nova-style filter rules, then a weigher, over plain data.

Every rule is a small function ``rule(host, spec, ratios) -> RuleResult``
that says why it passed or failed, with numbers, so the API can show the
operator exactly what stood in the way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from driver.model import Flavor, HostResources

from .errors import NoValidHost


@dataclass(frozen=True)
class HostState:
    """A candidate host: its service status and what its agent reported (None when down)."""

    name: str
    enabled: bool
    disabled_reason: str | None
    up: bool
    resources: HostResources | None
    error: str | None = None


@dataclass(frozen=True)
class RequestSpec:
    """The server to place: its flavor, where it runs now and what it runs on."""

    server: str
    name: str
    flavor: Flavor
    source_host: str
    arch: str
    hypervisor_type: str


@dataclass(frozen=True)
class Ratios:
    """Allocation ratios: how far a host's vCPUs, RAM and disk are over-committed."""

    cpu: float = 16.0
    ram: float = 1.5
    disk: float = 1.0


@dataclass(frozen=True)
class RuleResult:
    name: str
    passed: bool
    reason: str


Rule = Callable[[HostState, RequestSpec, Ratios], RuleResult]
NO_DATA = "no data: agent down"


def service_enabled(host: HostState, spec: RequestSpec, ratios: Ratios) -> RuleResult:
    if host.enabled:
        return RuleResult("service_enabled", True, "compute service enabled")
    why = f": {host.disabled_reason}" if host.disabled_reason else " (no reason given)"
    return RuleResult("service_enabled", False, f"compute service disabled{why}")


def not_current_host(host: HostState, spec: RequestSpec, ratios: Ratios) -> RuleResult:
    if host.name != spec.source_host:
        return RuleResult("not_current_host", True, f"server runs on {spec.source_host}")
    return RuleResult("not_current_host", False, f"server {spec.name} already runs on {host.name}")


def agent_up(host: HostState, spec: RequestSpec, ratios: Ratios) -> RuleResult:
    if host.up and host.resources is not None:
        return RuleResult("agent_up", True, "agent answers")
    return RuleResult("agent_up", False, f"agent down: {host.error or 'no answer'}")


def arch(host: HostState, spec: RequestSpec, ratios: Ratios) -> RuleResult:
    if host.resources is None:
        return RuleResult("arch", False, NO_DATA)
    have = host.resources.arch
    return RuleResult("arch", have == spec.arch, f"host is {have}, server needs {spec.arch}")


def hypervisor_type(host: HostState, spec: RequestSpec, ratios: Ratios) -> RuleResult:
    if host.resources is None:
        return RuleResult("hypervisor_type", False, NO_DATA)
    have = host.resources.hypervisor_type
    # libvirt spells the same hypervisor "QEMU" or "qemu" depending on where it is asked.
    return RuleResult("hypervisor_type", have.casefold() == spec.hypervisor_type.casefold(),
                      f"host runs {have}, server needs {spec.hypervisor_type}")


def free_vcpus(r: HostResources, ratios: Ratios) -> float:
    return r.vcpus * ratios.cpu - r.vcpus_used


def free_ram_mb(r: HostResources, ratios: Ratios) -> float:
    return r.memory_mb * ratios.ram - r.memory_mb_used


def free_disk_gb(r: HostResources, ratios: Ratios) -> float:
    return r.disk_gb * ratios.disk - r.disk_gb_used


def vcpus(host: HostState, spec: RequestSpec, ratios: Ratios) -> RuleResult:
    if host.resources is None:
        return RuleResult("vcpus", False, NO_DATA)
    r, need = host.resources, spec.flavor.vcpus
    free = free_vcpus(r, ratios)
    return RuleResult("vcpus", free >= need,
                      f"needs {need} vCPUs, {_num(free)} free of {r.vcpus} x {_num(ratios.cpu)}")


def ram(host: HostState, spec: RequestSpec, ratios: Ratios) -> RuleResult:
    if host.resources is None:
        return RuleResult("ram", False, NO_DATA)
    r, need = host.resources, spec.flavor.memory_mb
    free = free_ram_mb(r, ratios)
    return RuleResult("ram", free >= need,
                      f"needs {need} MiB RAM, {_num(free)} MiB free of {r.memory_mb} x {_num(ratios.ram)}")


def disk(host: HostState, spec: RequestSpec, ratios: Ratios) -> RuleResult:
    if host.resources is None:
        return RuleResult("disk", False, NO_DATA)
    r, need = host.resources, spec.flavor.root_gb + spec.flavor.ephemeral_gb
    free = free_disk_gb(r, ratios)
    return RuleResult("disk", free >= need,
                      f"needs {need} GiB disk, {_num(free)} GiB free of {r.disk_gb} x {_num(ratios.disk)}")


RULES: tuple[Rule, ...] = (service_enabled, not_current_host, agent_up, arch, hypervisor_type, vcpus, ram,
                           disk)


def check(host: HostState, spec: RequestSpec, ratios: Ratios) -> list[RuleResult]:
    """Every rule's verdict on ``host`` for ``spec``, in rule order (none short-circuits)."""
    return [rule(host, spec, ratios) for rule in RULES]


def first_failure(results: list[RuleResult]) -> RuleResult | None:
    return next((r for r in results if not r.passed), None)


def select(hosts: list[HostState], spec: RequestSpec, ratios: Ratios) -> str:
    """The name of the passing host with the most free RAM, then fewest instances, then
    first by name. Raises NoValidHost listing each host's first failing rule."""
    passing: list[HostState] = []
    failures: list[str] = []
    for host in hosts:
        failed = first_failure(check(host, spec, ratios))
        if failed is None:
            passing.append(host)
        else:
            failures.append(f"{host.name}: {failed.name} ({failed.reason})")
    if not passing:
        raise NoValidHost(server=spec.name or spec.server,
                          reason="; ".join(failures) if failures else "no hosts configured")

    def weight(h: HostState) -> tuple[float, int, str]:
        assert h.resources is not None  # agent_up passed
        return (-free_ram_mb(h.resources, ratios), h.resources.instances, h.name)

    return min(passing, key=weight).name


def _num(x: float) -> str:
    """A count or ratio for a reason: 16 not 16.0, 1.5 as 1.5."""
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}".rstrip("0")
