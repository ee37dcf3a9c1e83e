"""/v2.1 os-services and os-hypervisors: one compute service and hypervisor per configured host,
with UUIDs that stay the same across controllers and restarts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from controller.nova.hypervisors import hypervisor_id
from controller.nova.services import service_id
from tests.unit import test_controller_api as base
from tests.unit.controller_env import Env
from tests.unit.test_controller_api import OFF, PAUSED, VM
from tests.unit.test_nova_servers import nova

# host1 has web (running), db (shut off) and cache (paused); host2 nothing.
env = base.env


def services(c: TestClient, **query: str) -> list[dict[str, Any]]:
    r = c.get("os-services", params=query)
    assert r.status_code == 200, r.text
    return r.json()["services"]


def test_one_compute_service_per_host_with_a_stable_uuid(env: Env, tmp_path: Path) -> None:
    listed = services(nova(env))
    assert [(s["host"], s["binary"], s["status"], s["state"]) for s in listed] == \
        [("host1", "nova-compute", "enabled", "up"), ("host2", "nova-compute", "enabled", "up")]
    assert [s["id"] for s in listed] == [service_id("host1"), service_id("host2")]
    env.start_controller()   # a restart: the same UUIDs
    assert [s["id"] for s in services(nova(env))] == [service_id("host1"), service_id("host2")]
    assert len({service_id("host1"), service_id("host2"), hypervisor_id("host1")}) == 3
    assert [s["host"] for s in services(nova(env), host="host2", binary="nova-compute")] == ["host2"]
    assert services(nova(env), binary="nova-scheduler") == []
    env.cut("host2")
    assert [s["state"] for s in services(nova(env))] == ["up", "down"]


def test_disable_and_enable_a_service_by_uuid(env: Env) -> None:
    c = nova(env)
    sid = service_id("host2")
    r = c.put(f"os-services/{sid}", json={"status": "disabled", "disabled_reason": "disk swap"})
    assert r.status_code == 200, r.text
    assert (r.json()["service"]["status"], r.json()["service"]["disabled_reason"]) == ("disabled", "disk swap")
    host2 = env.conductor.store.get_host("host2")
    assert (host2.enabled, host2.disabled_reason) == (False, "disk swap")
    r = c.post(f"servers/{VM}/action", json={"migrate": {"host": "host2"}})
    assert r.status_code == 400 and "service_enabled" in r.json()["badRequest"]["message"]
    r = c.put(f"os-services/{sid}", json={"status": "enabled"})
    assert (r.json()["service"]["status"], r.json()["service"]["disabled_reason"]) == ("enabled", None)
    assert env.conductor.store.get_host("host2").enabled


@pytest.mark.parametrize("ref, body, status", [
    (service_id("host2"), {"status": "enabled", "disabled_reason": "why"}, 400),
    (service_id("host2"), {"status": "off"}, 400),
    (service_id("host2"), {}, 400),
    (service_id("host2"), {"forced_down": True}, 400),
    (service_id("host2"), {"status": "disabled", "zone": "x"}, 400),
    (service_id("host9"), {"status": "disabled"}, 404),
    ("disable", {"host": "host2", "binary": "nova-compute"}, 404),
])
def test_bad_service_updates(env: Env, ref: str, body: Any, status: int) -> None:
    r = nova(env).put(f"os-services/{ref}", json=body)
    assert r.status_code == status, r.text


def test_services_before_2_53_are_addressed_by_host_and_binary(env: Env) -> None:
    c = nova(env, "2.52")
    r = c.put("os-services/disable-log-reason",
              json={"host": "host2", "binary": "nova-compute", "disabled_reason": "disk swap"})
    assert r.json() == {"service": {"host": "host2", "binary": "nova-compute", "status": "disabled",
                                    "disabled_reason": "disk swap"}}
    assert env.conductor.store.get_host("host2").enabled is False
    r = c.put("os-services/enable", json={"host": "host2", "binary": "nova-compute"})
    assert r.json()["service"]["status"] == "enabled" and env.conductor.store.get_host("host2").enabled
    assert c.put("os-services/disable", json={"host": "host9", "binary": "nova-compute"}).status_code == 404
    assert c.put("os-services/disable", json={"host": "host2", "binary": "nova-api"}).status_code == 400
    assert c.put(f"os-services/{service_id('host2')}", json={"status": "disabled"}).status_code == 404


def test_hypervisors_list_detail_and_show(env: Env) -> None:
    c = nova(env)
    listed = c.get("os-hypervisors").json()["hypervisors"]
    assert listed == [{"id": hypervisor_id(h), "hypervisor_hostname": h, "state": "up", "status": "enabled"}
                      for h in ("host1", "host2")]
    [h1, _] = c.get("os-hypervisors/detail").json()["hypervisors"]
    assert (h1["vcpus_used"], h1["memory_mb_used"], h1["running_vms"], h1["host_ip"]) == (3, 1536, 3, "198.18.0.11")
    assert h1["service"] == {"host": "host1", "id": service_id("host1"), "disabled_reason": None}
    assert h1["free_ram_mb"] == h1["memory_mb"] - 1536 and h1["hypervisor_type"] == "QEMU"
    shown = c.get(f"os-hypervisors/{hypervisor_id('host1')}", params={"with_servers": "true"}).json()["hypervisor"]
    assert {s["uuid"] for s in shown["servers"]} == {VM, OFF, PAUSED}
    assert c.get("os-hypervisors/host1").status_code == 404
    env.cut("host2")
    down = c.get("os-hypervisors/detail").json()["hypervisors"][1]
    assert (down["state"], down["vcpus"], down["running_vms"]) == ("down", 0, 0)


def test_hypervisors_by_pattern_with_their_servers(env: Env) -> None:
    c = nova(env)
    r = c.get("os-hypervisors", params={"hypervisor_hostname_pattern": "host1", "with_servers": "True"})
    [h1] = r.json()["hypervisors"]
    assert {s["uuid"] for s in h1["servers"]} == {VM, OFF, PAUSED}
    [h2] = c.get("os-hypervisors/detail", params={"hypervisor_hostname_pattern": "st2",
                                                  "with_servers": "true"}).json()["hypervisors"]
    assert "servers" not in h2 and h2["service"]["host"] == "host2"   # Nova leaves the key out when empty
    r = c.get("os-hypervisors", params={"hypervisor_hostname_pattern": "host9"})
    assert r.status_code == 404 and "host9" in r.json()["itemNotFound"]["message"]
    assert c.get("os-hypervisors/host1/servers").status_code == 404   # gone in 2.53
    old = nova(env, "2.52")
    [h1] = old.get("os-hypervisors/host1/servers").json()["hypervisors"]
    assert {s["uuid"] for s in h1["servers"]} == {VM, OFF, PAUSED}
    assert [h["hypervisor_hostname"] for h in old.get("os-hypervisors/host/search").json()["hypervisors"]] == \
        ["host1", "host2"]
    assert isinstance(nova(env, "2.27").get("os-hypervisors/detail").json()["hypervisors"][0]["cpu_info"], str)
