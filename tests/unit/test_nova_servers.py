"""/v2.1 servers and os-migrations: Nova's fields over the controller's inventory and records,
the migration actions through the same conductor as /v1."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from controller import records
from controller.errors import ControllerError
from controller.records import MigrationStatus
from tests.unit import test_controller_api as base
from tests.unit.controller_env import TOKEN, Env
from tests.unit.test_controller_api import OFF, PAUSED, VM

FINAL = frozenset(records.FINAL)
# host1 has web (running), db (shut off) and cache (paused); host2 nothing.
env = base.env


def nova(env: Env, version: str = "2.87") -> TestClient:
    assert env.ctl is not None
    return TestClient(env.ctl.app, base_url="http://testserver/v2.1/",
                      headers={"X-Auth-Token": TOKEN, "OpenStack-API-Version": f"compute {version}"})


def server(c: TestClient, uuid: str) -> dict[str, Any]:
    r = c.get(f"servers/{uuid}")
    assert r.status_code == 200, r.text
    return r.json()["server"]


def migrate(env: Env, c: TestClient, uuid: str, body: Any) -> records.MigrationRecord:
    r = c.post(f"servers/{uuid}/action", json=body)
    assert r.status_code == 202 and r.content == b"", r.text
    return env.wait(env.conductor.store.list_migrations(server=uuid)[0].id)


def test_a_server_has_novas_fields(env: Env) -> None:
    s = server(nova(env), VM)
    assert (s["id"], s["name"], s["status"], s["progress"]) == (VM, "web", "ACTIVE", 0)
    assert (s["OS-EXT-SRV-ATTR:host"], s["OS-EXT-SRV-ATTR:hypervisor_hostname"]) == ("host1", "host1")
    assert (s["OS-EXT-STS:vm_state"], s["OS-EXT-STS:task_state"], s["OS-EXT-STS:power_state"]) == ("active", None, 1)
    assert s["flavor"] == {"original_name": "small", "vcpus": 1, "ram": 512, "disk": 1, "ephemeral": 0, "swap": 0,
                           "extra_specs": {}}
    assert s["links"][0] == {"rel": "self", "href": f"http://testserver/v2.1/servers/{VM}"}
    assert server(nova(env, "2.46"), VM)["flavor"] == {"id": "small", "links": []}
    assert server(nova(env), OFF)["OS-EXT-STS:vm_state"] == "stopped"


def test_servers_are_found_by_uuid_and_listed_by_name(env: Env) -> None:
    c = nova(env)
    r = c.get("servers/web")
    assert r.status_code == 404 and r.json()["itemNotFound"]["message"] == "Instance web could not be found."
    assert [s["id"] for s in c.get("servers/detail", params={"name": "web"}).json()["servers"]] == [VM]
    assert [s["name"] for s in c.get("servers/detail", params={"name": "^c"}).json()["servers"]] == ["cache"]
    assert {s["name"] for s in c.get("servers").json()["servers"]} == {"web", "db", "cache"}
    assert c.get("servers/detail", params={"host": "host2"}).json()["servers"] == []


def test_migrate_to_a_host_then_confirm(env: Env) -> None:
    c = nova(env)
    m = migrate(env, c, VM, {"migrate": {"host": "host2"}})
    assert (m.status, m.dest_compute, m.forced) == (MigrationStatus.FINISHED, "host2", False)
    s = server(c, VM)
    assert (s["status"], s["OS-EXT-SRV-ATTR:host"], s["OS-EXT-STS:vm_state"], s["progress"]) == \
        ("VERIFY_RESIZE", "host2", "resized", 100)
    r = c.post(f"servers/{VM}/action", json={"confirmResize": None})
    assert r.status_code == 204
    assert env.wait(m.id, FINAL).status == MigrationStatus.CONFIRMED
    assert (server(c, VM)["status"], env.where(VM)) == ("ACTIVE", {"host2": 1})


def test_migrate_without_a_host_then_revert(env: Env) -> None:
    c = nova(env, "2.1")
    m = migrate(env, c, OFF, {"migrate": None})
    assert m.dest_compute == "host2"
    assert c.post(f"servers/{OFF}/action", json={"revertResize": None}).status_code == 202
    assert env.wait(m.id, FINAL).status == MigrationStatus.REVERTED
    assert (server(c, OFF)["status"], env.where(OFF)) == ("SHUTOFF", {"host1": 4})


def test_live_migration(env: Env) -> None:
    m = migrate(env, nova(env), VM, {"os-migrateLive": {"host": "host2", "block_migration": "auto"}})
    assert (m.status, m.migration_type) == (MigrationStatus.COMPLETED, records.MigrationType.LIVE)


@pytest.mark.parametrize("version, uuid, body, status, text", [
    ("2.55", VM, {"migrate": {"host": "host2"}}, 400, "'host' was unexpected"),
    ("2.87", VM, {"migrate": {"host": "host2", "force": True}}, 400, "migrate: force"),
    ("2.87", VM, {"migrate": {"host": "host9"}}, 400, "unknown host 'host9'"),
    ("2.87", VM, {"migrate": {"host": "host1"}}, 400, "is the source host"),
    ("2.87", VM, {"reboot": {"type": "HARD"}}, 400, "There is no such action: reboot"),
    ("2.87", VM, {"migrate": None, "confirmResize": None}, 400, "exactly one action"),
    ("2.87", VM, {"confirmResize": None}, 409, "no migration waiting"),
    ("2.87", PAUSED, {"migrate": None}, 409, "paused"),
    ("2.87", "00000000-0000-4000-8000-00000000ffff", {"migrate": None}, 404, "could not be found"),
])
def test_refused_actions_say_why_in_nova_shape(env: Env, version: str, uuid: str, body: Any, status: int,
                                               text: str) -> None:
    r = nova(env, version).post(f"servers/{uuid}/action", json=body)
    [(fault, inner)] = r.json().items()
    assert (r.status_code, inner["code"]) == (status, status) and text in inner["message"], r.text
    assert fault == {400: "badRequest", 404: "itemNotFound", 409: "conflictingRequest"}[status]


def test_a_failed_migration_shows_error_until_the_next_one(env: Env) -> None:
    c = nova(env)
    env.drivers["host2"].fail("finish_migration", ControllerError(reason="bridge br9 missing"))
    r = c.post(f"servers/{VM}/action", json={"migrate": {"host": "host2"}})
    assert r.status_code == 202
    m = env.wait(env.conductor.store.list_migrations(server=VM)[0].id, FINAL)
    assert m.status == MigrationStatus.ERROR
    s = server(c, VM)
    assert (s["status"], s["OS-EXT-STS:vm_state"], s["OS-EXT-SRV-ATTR:host"]) == ("ERROR", "error", "host1")
    assert f"migration {m.id} error" in s["fault"]["message"] and "br9" in s["fault"]["message"]
    m2 = migrate(env, c, VM, {"migrate": {"host": "host2"}})
    assert m2.status == MigrationStatus.FINISHED and server(c, VM)["status"] == "VERIFY_RESIZE"


def test_os_migrations_have_novas_names_and_filters(env: Env) -> None:
    c = nova(env)
    m = migrate(env, c, VM, {"migrate": {"host": "host2"}})
    [row] = c.get("os-migrations").json()["migrations"]
    assert row == {"id": m.id, "uuid": m.uuid, "source_node": "host1", "dest_node": "host2",
                   "source_compute": "host1", "dest_compute": "host2", "dest_host": "198.18.0.12",
                   "status": "finished", "instance_uuid": VM, "old_instance_type_id": None,
                   "new_instance_type_id": None, "migration_type": "migration", "user_id": None,
                   "project_id": None, "created_at": row["created_at"], "updated_at": row["updated_at"]}
    for query, count in [({"instance_uuid": VM}, 1), ({"instance_uuid": OFF}, 0), ({"host": "host2"}, 1),
                         ({"status": "finished"}, 1), ({"status": "no-such-status"}, 0),
                         ({"migration_type": "live-migration"}, 0), ({"source_compute": "host2"}, 0),
                         ({"changes-since": "2000-01-01T00:00:00Z"}, 1), ({"changes-before": "2000-01-01"}, 0),
                         ({"limit": 0}, 0), ({"marker": m.uuid}, 0)]:
        assert len(c.get("os-migrations", params=query).json()["migrations"]) == count, query
    r = c.get("os-migrations", params={"changes-since": "yesterday"})
    assert r.status_code == 400 and "changes-since" in r.json()["badRequest"]["message"]
    assert c.get("os-migrations", params={"marker": "nope"}).status_code == 400
    old = nova(env, "2.22").get("os-migrations").json()["migrations"][0]
    assert "migration_type" not in old and "uuid" not in old and "user_id" not in old
    assert "uuid" in nova(env, "2.59").get("os-migrations").json()["migrations"][0]
