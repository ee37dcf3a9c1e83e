"""The scheduler's rules, their reasons, and the choice among passing hosts."""

from __future__ import annotations

import dataclasses

import pytest

from controller import scheduler
from controller.errors import NoValidHost
from controller.scheduler import HostState, Ratios, RequestSpec, RuleResult
from driver.model import Flavor, HostResources

RATIOS = Ratios(cpu=16.0, ram=1.5, disk=1.0)
SPEC = RequestSpec(server="1f0c-uuid", name="web1", flavor=Flavor("m1.small", 2, 2048, 10, 5),
                   source_host="src", arch="x86_64", hypervisor_type="QEMU")


def resources(**kw) -> HostResources:
    base = dict(hostname="h", arch="x86_64", hypervisor_type="QEMU", hypervisor_version=8002000, vcpus=4,
                vcpus_used=0, memory_mb=4096, memory_mb_used=0, disk_gb=100, disk_gb_used=0, instances=0)
    return HostResources(**{**base, **kw})


def host(name: str = "dst", enabled: bool = True, reason: str | None = None, **res) -> HostState:
    return HostState(name, enabled, reason, True, resources(hostname=name, **res))


def results(h: HostState, spec: RequestSpec = SPEC, ratios: Ratios = RATIOS) -> dict[str, RuleResult]:
    return {r.name: r for r in scheduler.check(h, spec, ratios)}


def test_rules_run_in_the_documented_order_and_all_pass():
    out = scheduler.check(host(), SPEC, RATIOS)
    assert [r.name for r in out] == ["service_enabled", "not_current_host", "agent_up", "arch", "hypervisor_type",
                                     "vcpus", "ram", "disk"]
    assert all(r.passed for r in out) and scheduler.first_failure(out) is None
    by_name = {r.name: r.reason for r in out}
    assert by_name["ram"] == "needs 2048 MiB RAM, 6144 MiB free of 4096 x 1.5"
    assert by_name["vcpus"] == "needs 2 vCPUs, 64 free of 4 x 16"
    assert by_name["disk"] == "needs 15 GiB disk, 100 GiB free of 100 x 1"


@pytest.mark.parametrize("h, spec, rule, reason", [
    (host(enabled=False, reason="maintenance"), SPEC, "service_enabled", "compute service disabled: maintenance"),
    (host(enabled=False), SPEC, "service_enabled", "compute service disabled (no reason given)"),
    (host("src"), SPEC, "not_current_host", "server web1 already runs on src"),
    (HostState("dst", True, None, False, None, "connection refused"), SPEC, "agent_up",
     "agent down: connection refused"),
    (host(arch="aarch64"), SPEC, "arch", "host is aarch64, server needs x86_64"),
    (host(hypervisor_type="Xen"), SPEC, "hypervisor_type", "host runs Xen, server needs QEMU"),
    (host(vcpus=1, vcpus_used=15), SPEC, "vcpus", "needs 2 vCPUs, 1 free of 1 x 16"),
    (host(memory_mb_used=5120), SPEC, "ram", "needs 2048 MiB RAM, 1024 MiB free of 4096 x 1.5"),
    (host(disk_gb=20, disk_gb_used=6), SPEC, "disk", "needs 15 GiB disk, 14 GiB free of 20 x 1"),
])
def test_each_rule_fails_with_its_reason(h, spec, rule, reason):
    out = results(h, spec)
    assert out[rule] == RuleResult(rule, False, reason)
    assert scheduler.first_failure(list(out.values())) == out[rule]


def test_limits_are_inclusive():
    # Exactly enough of everything passes.
    exact = host(vcpus=1, vcpus_used=14, memory_mb=2048, memory_mb_used=1024, disk_gb=15)
    assert all(r.passed for r in results(exact).values())


def test_ratios_change_the_verdict():
    h = host(vcpus=2, vcpus_used=2, memory_mb=2048, memory_mb_used=1024, disk_gb=10)
    tight = results(h, ratios=Ratios(cpu=1.0, ram=1.0, disk=1.0))
    assert [r.name for r in tight.values() if not r.passed] == ["vcpus", "ram", "disk"]
    assert tight["ram"].reason == "needs 2048 MiB RAM, 1024 MiB free of 2048 x 1"
    loose = results(h, ratios=Ratios(cpu=2.0, ram=1.5, disk=1.5))
    assert all(r.passed for r in loose.values())
    assert loose["ram"].reason == "needs 2048 MiB RAM, 2048 MiB free of 2048 x 1.5"
    assert results(h, ratios=Ratios(cpu=2.0, ram=1.25, disk=1.5))["ram"].reason.endswith("2048 x 1.25")


def test_hypervisor_type_ignores_case():
    assert results(host(hypervisor_type="qemu"))["hypervisor_type"].passed


def test_agent_down_leaves_the_resource_rules_without_data():
    out = results(HostState("dst", False, "off", False, None, "timed out"))
    assert out["service_enabled"].reason == "compute service disabled: off"  # still evaluated
    assert out["not_current_host"].passed
    for name in ("arch", "hypervisor_type", "vcpus", "ram", "disk"):
        assert out[name] == RuleResult(name, False, "no data: agent down")
    assert scheduler.first_failure(list(out.values())).name == "service_enabled"


def test_select_prefers_free_ram_then_fewest_instances_then_name():
    hosts = [host("c", memory_mb_used=1024, instances=1), host("b", instances=3), host("a", instances=3),
             host("d", instances=1)]
    assert scheduler.select(hosts, SPEC, RATIOS) == "d"  # most RAM, fewer instances than a and b
    assert scheduler.select(hosts[:3], SPEC, RATIOS) == "a"  # a and b tie: by name
    assert scheduler.select([hosts[0], host("e", memory_mb=8192, instances=9)], SPEC, RATIOS) == "e"


def test_select_free_ram_counts_the_ratio():
    # 4096 x 1.5 - 2048 = 4096 free beats 5000 x 1.5 - 3500 = 4000 free.
    hosts = [host("big", memory_mb=5000, memory_mb_used=3500), host("small", memory_mb_used=2048)]
    assert scheduler.select(hosts, SPEC, RATIOS) == "small"


def test_select_skips_failing_hosts():
    hosts = [host("src", memory_mb=65536), host("off", enabled=False, memory_mb=65536), host("ok")]
    assert scheduler.select(hosts, SPEC, RATIOS) == "ok"


def test_no_valid_host_lists_each_hosts_first_failure():
    hosts = [host("src"), host("full", memory_mb_used=6000),
             dataclasses.replace(host("down"), up=False, resources=None, error="connection refused")]
    with pytest.raises(NoValidHost) as e:
        scheduler.select(hosts, SPEC, RATIOS)
    assert str(e.value) == (
        "no valid host for server web1: src: not_current_host (server web1 already runs on src); "
        "full: ram (needs 2048 MiB RAM, 144 MiB free of 4096 x 1.5); "
        "down: agent_up (agent down: connection refused)")
    assert e.value.status == 400 and e.value.server == "web1"


def test_no_hosts_at_all():
    with pytest.raises(NoValidHost, match="no valid host for server web1: no hosts configured"):
        scheduler.select([], SPEC, RATIOS)
