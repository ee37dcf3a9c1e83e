"""The controller's HTTP API: every bad input gets its status and a reason; drains end to end."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from controller import records
from controller.records import MigrationStatus
from driver.model import PowerState
from tests.unit.controller_env import TOKEN, Env
from tests.unit.test_agent_api import assert_400_not_422_and_401

VM = "00000000-0000-4000-8000-0000000000a1"
OFF = "00000000-0000-4000-8000-0000000000a2"
PAUSED = "00000000-0000-4000-8000-0000000000a3"


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = Env.make(tmp_path, n=2)
    e.add("host1", VM, "web")
    e.add("host1", OFF, "db", PowerState.SHUTDOWN)
    e.add("host1", PAUSED, "cache", PowerState.PAUSED)
    return e


@pytest.fixture
def api(env: Env) -> TestClient:
    return env.api()


def migrate(api: TestClient, server: str, body: Any) -> Any:
    return api.post(f"/v1/servers/{server}/action", json=body)


def test_token_required(env: Env) -> None:
    bare = TestClient(env.ctl.app)
    assert bare.get("/v1/servers").status_code == 401
    wrong = bare.get("/v1/servers", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert bare.get("/openapi.json").json()["info"]["title"] == "coldferry controller"


@pytest.mark.parametrize("body, text", [
    ({"migrate": {"host": 5}}, "migrate.host"),
    ({"migrate": {"force": "yes please"}}, "migrate.force"),
    ({"migrate": {"hots": "host2"}}, "hots"),
    ({"migrate": {}, "confirmResize": None}, "exactly one action"),
    ({}, "exactly one action"),
    ({"reboot": None}, "exactly one action"),
])
def test_malformed_bodies_are_400_with_the_reason(api: TestClient, body: Any, text: str) -> None:
    r = migrate(api, "web", body)
    assert r.status_code == 400 and text in r.json()["detail"], r.text


def test_invalid_json_is_400(api: TestClient) -> None:
    r = api.post("/v1/servers/web/action", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "malformed request" in r.json()["detail"]


@pytest.mark.parametrize("server, body, status, text", [
    ("web", {"migrate": {"host": None, "force": True}}, 400, "force needs a target host"),
    ("web", {"migrate": {"host": "host1"}}, 400, "target host host1 is the source host"),
    ("web", {"migrate": {"host": "host9"}}, 400, "unknown host 'host9'"),
    ("cache", {"migrate": {"host": "host2"}}, 409, "paused"),
    ("nobody", {"migrate": {"host": "host2"}}, 404, "server nobody not found"),
    ("web", {"confirmResize": None}, 409, "no migration waiting"),
])
def test_migrate_errors(api: TestClient, server: str, body: Any, status: int, text: str) -> None:
    r = migrate(api, server, body)
    assert r.status_code == status and text in r.json()["detail"], r.text


def test_disabled_host_fails_check_unless_forced(env: Env, api: TestClient) -> None:
    r = api.put("/v1/os-services/host2", json={"status": "disabled", "disabled_reason": "disk swap"})
    assert r.status_code == 200 and (r.json()["status"], r.json()["disabled_reason"]) == ("disabled", "disk swap")
    r = migrate(api, "web", {"migrate": {"host": "host2"}})
    assert r.status_code == 400 and "service_enabled" in r.json()["detail"]
    check = api.get("/v1/os-hosts/host2/check-destination", params={"server": "web"}).json()
    assert check["passes"] is False and check["failed"] == "service_enabled"
    assert [x["name"] for x in check["rules"]][:3] == ["service_enabled", "not_current_host", "agent_up"]
    r = migrate(api, "web", {"migrate": {"host": "host2", "force": True}})
    assert r.status_code == 202 and r.json()["migration"]["forced"] is True
    assert api.put("/v1/os-services/host2", json={"status": "enabled"}).json()["disabled_reason"] is None
    assert api.put("/v1/os-services/host2", json={"status": "off"}).status_code == 400
    assert api.put("/v1/os-services/host7", json={"status": "enabled"}).status_code == 404


def test_migration_records_list_show_confirm(env: Env, api: TestClient) -> None:
    mid = migrate(api, "web", {"migrate": {"host": "host2"}}).json()["migration"]["id"]
    env.wait(mid)
    rec = api.get(f"/v1/os-migrations/{mid}").json()
    assert rec["status"] == "finished" and rec["bytes_sent"] > 0 and rec["source_compute"] == "host1"
    assert "source_job" not in rec
    assert api.get("/v1/servers/web").json()["status"] == "VERIFY_RESIZE"
    for query, count in [({}, 1), ({"host": "host2"}, 1), ({"status": "error"}, 0), ({"server": "web"}, 1),
                         ({"migration_type": "live-migration"}, 0), ({"changes-since": "2000-01-01T00:00:00Z"}, 1),
                         ({"changes-since": "2999-01-01T00:00:00Z"}, 0)]:
        assert len(api.get("/v1/os-migrations", params=query).json()["migrations"]) == count, query
    assert api.get("/v1/os-migrations", params={"changes-since": "yesterday"}).status_code == 400
    assert api.get("/v1/os-migrations", params={"status": "done"}).status_code == 400
    assert api.get("/v1/os-migrations/999").status_code == 404
    assert api.post(f"/v1/os-migrations/{mid}/confirm").status_code == 202
    assert env.wait(mid, frozenset(records.FINAL)).status == MigrationStatus.CONFIRMED
    r = api.post(f"/v1/os-migrations/{mid}/revert")
    assert r.status_code == 409 and "only a finished migration" in r.json()["detail"]


def test_hypervisors(api: TestClient, env: Env) -> None:
    hv = {h["name"]: h for h in api.get("/v1/os-hypervisors").json()["hypervisors"]}
    assert hv["host1"]["state"] == "up" and hv["host1"]["instances"] == 3
    assert hv["host1"]["vcpus_used"] == 3 and hv["host2"]["instances"] == 0
    assert api.get("/v1/os-hypervisors/host9").status_code == 404


def wait_drain(api: TestClient, drain_id: int, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        d = api.get(f"/v1/drains/{drain_id}").json()
        if d["status"] == "done":
            return d
        assert time.monotonic() < deadline, d
        time.sleep(0.02)


def test_drain_dry_run_plans_and_moves_nothing(api: TestClient, env: Env) -> None:
    r = api.post("/v1/os-hypervisors/host1/drain", json={"live": True, "dry_run": True})
    assert r.status_code == 200
    rows = {row["name"]: row for row in r.json()["rows"]}
    assert (rows["web"]["status"], rows["web"]["migration_type"]) == ("planned", "live-migration")
    assert (rows["db"]["status"], rows["db"]["migration_type"]) == ("planned", "migration")
    assert rows["cache"]["status"] == "error" and "paused" in rows["cache"]["error"]
    assert api.get("/v1/os-hypervisors/host1").json()["status"] == "enabled"
    assert len(env.where(VM)) == 1 and "host1" in env.where(VM)


def test_drain_moves_running_and_stopped_and_reports_the_paused_one(api: TestClient, env: Env) -> None:
    r = api.post("/v1/os-hypervisors/host1/drain", json={"max_servers": 2})
    assert r.status_code == 202
    d = wait_drain(api, r.json()["id"])
    rows = {row["name"]: row for row in d["rows"]}
    assert rows["web"]["status"] == "done" and rows["web"]["accepted"] is True
    assert rows["db"]["status"] == "done" and rows["db"]["state_before"] == "shutdown"
    assert rows["cache"]["status"] == "error" and rows["cache"]["accepted"] is False
    assert "paused" in rows["cache"]["error"]
    assert d["totals"] == {"total": 3, "queued": 0, "migrating": 0, "done": 2, "error": 1, "planned": 0}
    hv = api.get("/v1/os-hypervisors/host1").json()
    assert (hv["status"], hv["disabled_reason"]) == ("disabled", "draining for maintenance")
    assert env.where(VM)["host2"] == int(PowerState.RUNNING)


@pytest.mark.parametrize("host, body, text", [
    ("host9", {}, "unknown host"),
    ("host1", {"max_servers": 0}, "max_servers"),
    ("host1", {"force": True}, "force needs a target host"),
    ("host1", {"target_host": "host1"}, "target host host1 is the source host"),
    ("host1", {"target_host": "host9"}, "unknown host 'host9'"),
    ("host1", {"live": "maybe"}, "live"),
])
def test_drain_bad_inputs(api: TestClient, host: str, body: Any, text: str) -> None:
    r = api.post(f"/v1/os-hypervisors/{host}/drain", json=body)
    assert r.status_code == 400 and text in r.json()["detail"], r.text
    assert api.get("/v1/drains").json()["drains"] == []


def test_drain_of_a_host_whose_agent_is_down_is_refused(api: TestClient, env: Env) -> None:
    env.cut("host1")
    r = env.api().post("/v1/os-hypervisors/host1/drain", json={})
    assert r.status_code == 409 and "does not answer" in r.json()["detail"]
    assert env.api().get("/v1/os-hypervisors/host1").json()["state"] == "down"


def test_the_servers_of_a_host_whose_agent_is_down_are_not_shown_as_none(env: Env) -> None:
    env.add("host2", "00000000-0000-4000-8000-0000000000b1", "mail")
    env.cut("host1")
    r = env.api().get("/v1/servers", params={"host": "host1"})
    assert r.status_code == 409 and "cannot list the servers of host host1" in r.json()["detail"]
    # Listing every host still shows those that answer.
    assert [s["name"] for s in env.api().get("/v1/servers").json()["servers"]] == ["mail"]


def test_recover_route_answers_409_naming_the_silent_host_then_202(env: Env) -> None:
    from controller.records import MigrationStatus
    vm = "00000000-0000-4000-8000-0000000000c1"
    env.add("host1", vm, "rec")
    store = env.ctl.store
    m = store.create_migration(server=vm, server_name="rec", source_compute="host1", dest_compute="host2",
                               dest_address="198.18.0.12", status=MigrationStatus.NEEDS_RECOVERY,
                               task_state="resize_recovering", stopped_in="rolling-back", old_power_state=1,
                               error="copy failed")
    api = env.api()
    env.cut("host2")
    r = api.post(f"/v1/os-migrations/{m.id}/recover")
    assert r.status_code == 409 and "destination host2 does not answer" in r.json()["detail"]
    env.mend("host2")
    r = api.post(f"/v1/os-migrations/{m.id}/recover")
    assert r.status_code == 202 and r.json()["status"] == "rolling-back"
    m = env.wait(m.id)
    assert m.status == MigrationStatus.ERROR and "the source was restored" in m.error
    r = api.post(f"/v1/os-migrations/{m.id}/recover")
    assert r.status_code == 409 and "only a migration in needs-recovery" in r.json()["detail"]


HUGE = "99999999999999999999"


@pytest.mark.parametrize("method, path", [
    ("GET", f"/v1/os-migrations/{HUGE}"), ("POST", f"/v1/os-migrations/{HUGE}/confirm"),
    ("POST", f"/v1/os-migrations/{HUGE}/revert"), ("POST", f"/v1/os-migrations/{HUGE}/recover"),
    ("GET", f"/v1/drains/{HUGE}"), ("GET", f"/v1/os-migrations/{2 ** 63}"), ("GET", f"/v1/drains/{2 ** 31}"),
    ("GET", "/v1/os-migrations/-1"), ("GET", "/v1/drains/0"),
])
def test_an_id_no_record_can_have_is_404(env: Env, method: str, path: str) -> None:
    api = TestClient(env.ctl.app, headers={"Authorization": f"Bearer {TOKEN}"}, raise_server_exceptions=False)
    r = api.request(method, path)
    assert r.status_code == 404 and "not found" in r.json()["detail"], r.text


@pytest.mark.parametrize("since", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00", "10000-01-01T00:00:00Z"])
def test_a_changes_since_out_of_range_is_400_naming_the_parameter(env: Env, since: str) -> None:
    api = TestClient(env.ctl.app, headers={"Authorization": f"Bearer {TOKEN}"}, raise_server_exceptions=False)
    r = api.get("/v1/os-migrations", params={"changes-since": since})
    assert r.status_code == 400 and "changes-since" in r.json()["detail"], r.text


@pytest.mark.parametrize("path, body, text", [
    ("/v1/servers/web/action", {"migrate": {"host": "host2", "force": "yes"}}, "migrate.force"),
    ("/v1/servers/web/action", {"migrate": {"host": "host2", "force": 1}}, "migrate.force"),
    ("/v1/servers/web/action", {"os-migrateLive": {"host": "host2", "block_migration": "true"}}, "block_migration"),
    ("/v1/os-hypervisors/host1/drain", {"live": "true"}, "live"),
    ("/v1/os-hypervisors/host1/drain", {"max_servers": "2"}, "max_servers"),
    ("/v1/os-hypervisors/host1/drain", {"max_servers": 2.0}, "max_servers"),
    ("/v1/os-hypervisors/host1/drain", {"dry_run": 0}, "dry_run"),
])
def test_request_bodies_are_strict(api: TestClient, env: Env, path: str, body: Any, text: str) -> None:
    r = api.post(path, json=body)
    assert r.status_code == 400 and text in r.json()["detail"], r.text
    assert api.get("/v1/os-migrations").json()["migrations"] == [] and api.get("/v1/drains").json()["drains"] == []


def test_a_strict_body_still_takes_what_the_cli_sends(api: TestClient, env: Env) -> None:
    assert api.put("/v1/os-services/host2", json={"status": "disabled", "disabled_reason": "x"}).status_code == 200
    assert api.put("/v1/os-services/host2", json={"status": "enabled"}).status_code == 200
    r = api.post("/v1/os-hypervisors/host1/drain", json={"live": False, "max_servers": 2, "dry_run": True,
                                                         "target_host": "host2", "force": False})
    assert r.status_code == 200, r.text
    wait_drain(api, r.json()["id"])
    r = migrate(api, "db", {"migrate": {"host": "host2", "force": False}})
    assert r.status_code == 202, r.text
    env.wait(r.json()["migration"]["id"])


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'{"migrate": {"force": "yes"}}', b""])
def test_without_the_token_a_malformed_body_is_401_and_says_nothing_about_it(env: Env, body: bytes) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic " + TOKEN}):
        r = TestClient(env.ctl.app).post("/v1/servers/web/action", content=body,
                                         headers={"Content-Type": "application/json", **headers})
        assert r.status_code == 401 and "token" in r.json()["detail"] and "body" not in r.json()["detail"], r.text


def test_the_openapi_document_says_400_never_422_and_401_on_every_route(env: Env) -> None:
    doc = TestClient(env.ctl.app).get("/openapi.json").json()
    assert_400_not_422_and_401(doc)
    ops = doc["paths"]
    assert "404" in ops["/v1/os-migrations/{migration_id}"]["get"]["responses"]
    assert {"404", "409", "502"} <= set(ops["/v1/os-migrations/{migration_id}/confirm"]["post"]["responses"])
    assert {"200", "202"} <= set(ops["/v1/os-hypervisors/{host}/drain"]["post"]["responses"])
