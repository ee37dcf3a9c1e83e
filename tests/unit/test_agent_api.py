"""The agent's HTTP API (docs/api.md, section Agent) over MemoryDriver hosts."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from agent import JobRunner, create_app
from agent import schemas
from driver.base import ComputeDriver
from driver.errors import DriverError, InvalidInstanceState
from driver.memory import GiB, MemoryCloud, MemoryDriver
from driver.model import Flavor, PowerState

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UUID = "9a1c0f7e-0000-4000-8000-000000000001"
SMALL = Flavor("small", 2, 1024, 10)
FLAVOR = {"name": "small", "vcpus": 2, "memory_mb": 1024, "root_gb": 10, "ephemeral_gb": 0}
MIGRATION = {"id": "7", "source_host": "h1", "dest_host": "h2"}
WAIT = 5.0


class Gate:
    """An injectable sleep that blocks each copy step until the test lets it go."""

    def __init__(self) -> None:
        self.arrived = threading.Semaphore(0)
        self.go = threading.Semaphore(0)

    def sleep(self, seconds: float) -> None:
        self.arrived.release()
        self.go.acquire(timeout=WAIT)

    def step(self) -> None:
        """Wait until a copy step sleeps, then let it continue."""
        assert self.arrived.acquire(timeout=WAIT), "no copy step arrived"
        self.go.release()

    def open(self) -> None:
        for _ in range(100):
            self.go.release()


class Host:
    def __init__(self, driver: MemoryDriver) -> None:
        self.driver = driver
        self.client = TestClient(create_app(driver, TOKEN, driver.address, JobRunner()), headers=AUTH)

    def job(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST an operation, expect 202, wait for the job's end and return it."""
        r = self.client.post(f"/v1/instances/{UUID}/{path}", json={} if body is None else body)
        assert r.status_code == 202, r.text
        return self.wait(r.json()["id"])

    def wait(self, job_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            job = self.client.get(f"/v1/jobs/{job_id}").json()
            if job["state"] != "running":
                return job
            time.sleep(0.01)
        raise AssertionError(f"job {job_id} still running")


@pytest.fixture
def gate() -> Gate:
    g = Gate()
    yield g
    g.open()  # never leave a job thread blocked


@pytest.fixture
def cloud(gate):
    c = MemoryCloud()
    src = Host(MemoryDriver("h1", c, "198.18.0.11", step_delay=1.0, sleep=gate.sleep))
    dst = Host(MemoryDriver("h2", c, "198.18.0.12"))
    src.driver.add_instance(UUID, "vm1", SMALL)
    return src, dst


def migrate(src: Host, gate: Gate, body: dict[str, Any] | None = None) -> dict[str, Any]:
    gate.open()
    return src.job("migrate-disk-and-power-off", body or {"dest": "198.18.0.12"})


def finish(dst: Host, disk_info: str, **extra: Any) -> dict[str, Any]:
    return dst.job("finish-migration", {"name": "vm1", "flavor": FLAVOR, "disk_info": disk_info,
                                        "migration": MIGRATION, **extra})


# -- authentication -------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": TOKEN}])
def test_missing_or_wrong_token_is_401(cloud, headers):
    src, _ = cloud
    client = TestClient(src.client.app)
    for r in (client.get("/v1/host", headers=headers), client.get("/v1/jobs", headers=headers),
              client.post(f"/v1/instances/{UUID}/power-off", json={}, headers=headers)):
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json() == {"detail": "missing or wrong bearer token"}
    assert src.driver.get_instance(UUID).power_state == PowerState.RUNNING


def test_malformed_body_without_token_is_401_not_400(cloud):
    client = TestClient(cloud[0].client.app)
    r = client.post(f"/v1/instances/{UUID}/migrate-disk-and-power-off", content=b"{oops",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 401


def test_empty_token_is_refused():
    with pytest.raises(ValueError, match="non-empty token"):
        create_app(MemoryDriver("h"), "", "h")


# -- reads --------------------------------------------------------------------------------

def test_host_reports_resources_and_address(cloud):
    src, _ = cloud
    host = src.client.get("/v1/host").json()
    assert host["address"] == "198.18.0.11" and host["hostname"] == "h1"
    assert (host["vcpus_used"], host["memory_mb_used"], host["disk_gb_used"], host["instances"]) == (2, 1024, 10, 1)


def test_instances_and_one_instance(cloud):
    src, _ = cloud
    expected = {"uuid": UUID, "name": "vm1", "flavor": FLAVOR, "host": "h1", "power_state": 1, "state": "running"}
    assert src.client.get("/v1/instances").json() == {"instances": [expected]}
    assert src.client.get(f"/v1/instances/{UUID}").json() == expected


def test_unknown_instance_is_404(cloud):
    src, _ = cloud
    r = src.client.get("/v1/instances/nope")
    assert r.status_code == 404 and "instance nope is not defined on this host (h1)" in r.json()["detail"]


@pytest.mark.parametrize("op,body", [("power-on", {}), ("power-off", {}), ("live-migrate", {"dest": "h2"}),
                                     ("migrate-disk-and-power-off", {"dest": "h2"})])
def test_ops_on_an_unknown_instance_are_404(cloud, op, body):
    src, _ = cloud
    r = src.client.post(f"/v1/instances/nope/{op}", json=body)
    assert r.status_code == 404 and "nope" in r.json()["detail"]
    assert src.client.get("/v1/jobs").json() == {"jobs": []}


def test_confirm_does_not_look_the_instance_up(cloud):
    _, dst = cloud
    assert dst.job("confirm-migration", {"migration": MIGRATION})["state"] == "done"


def test_sync_driver_errors_map_to_status(cloud, caplog):
    src, _ = cloud
    src.driver.fail("host_resources", DriverError(reason="libvirt is down"))
    r = src.client.get("/v1/host")
    assert (r.status_code, r.json()) == (503, {"detail": "driver error: libvirt is down"})
    assert "GET /v1/host failed: driver error: libvirt is down" in caplog.text
    src.driver.fail("get_instance", InvalidInstanceState(uuid=UUID, state="odd", reason="try later"))
    r = src.client.get(f"/v1/instances/{UUID}")
    assert r.status_code == 409 and "try later" in r.json()["detail"]


@pytest.mark.parametrize("method, path, op", [
    ("get", "/v1/host", "host_resources"), ("get", "/v1/instances", "list_instances"),
    ("get", f"/v1/instances/{UUID}", "get_instance"), ("post", f"/v1/instances/{UUID}/power-on", "get_instance")])
def test_a_driver_failure_on_any_read_path_is_503_with_its_message(cloud, method, path, op):
    src, _ = cloud
    src.driver.fail(op, DriverError(reason="libvirt: connection reset"))
    r = getattr(src.client, method)(path)
    assert (r.status_code, r.json()) == (503, {"detail": "driver error: libvirt: connection reset"})


def test_an_unexpected_exception_is_500_with_a_generic_message_and_a_logged_traceback(cloud, caplog):
    src, _ = cloud
    src.driver.fail("list_instances", KeyError("flavor"))
    r = src.client.get("/v1/instances")
    assert r.status_code == 500
    assert r.json() == {"detail": "internal error in the agent (a bug); the agent's log has the traceback"}
    assert "GET /v1/instances failed with an unexpected error" in caplog.text
    assert "KeyError: 'flavor'" in caplog.text  # the traceback
    assert src.client.get("/v1/instances").status_code == 200  # the agent goes on serving


def test_unknown_job_is_404(cloud):
    r = cloud[0].client.get("/v1/jobs/feedface")
    assert r.status_code == 404 and "agent restarted" in r.json()["detail"]


def test_openapi_document_is_served(cloud):
    doc = cloud[0].client.get("/openapi.json").json()
    paths = set(doc["paths"])
    for op in ("power-on", "power-off", "migrate-disk-and-power-off", "finish-migration", "confirm-migration",
               "finish-revert-migration", "destroy", "live-migrate"):
        assert f"/v1/instances/{{uuid}}/{op}" in paths
        assert "202" in doc["paths"][f"/v1/instances/{{uuid}}/{op}"]["post"]["responses"]
    assert {"/v1/host", "/v1/instances", "/v1/instances/{uuid}", "/v1/jobs", "/v1/jobs/{job_id}"} <= paths
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"



def assert_400_not_422_and_401(doc: dict[str, Any]) -> None:
    """Every operation of an OpenAPI document answers 401, and 400 (never 422) where it takes input."""
    for path, item in doc["paths"].items():
        for method, op in item.items():
            answers = op["responses"]
            assert "422" not in answers and "401" in answers, (method, path, sorted(answers))
            if op.get("requestBody") or op.get("parameters"):
                assert answers["400"]["content"]["application/json"]["schema"], (method, path)
    assert "HTTPValidationError" not in doc.get("components", {}).get("schemas", {})


def test_openapi_document_says_what_the_agent_answers(cloud):
    doc = cloud[0].client.get("/openapi.json").json()
    assert_400_not_422_and_401(doc)
    ops = doc["paths"]
    assert {"404", "503"} <= set(ops["/v1/instances/{uuid}"]["get"]["responses"])
    assert {"202", "400", "404", "409", "503"} <= set(ops["/v1/instances/{uuid}/power-off"]["post"]["responses"])
    assert {"202", "400", "409"} <= set(ops["/v1/instances/{uuid}/finish-migration"]["post"]["responses"])
    assert "404" in ops["/v1/jobs/{job_id}"]["get"]["responses"]

# -- malformed bodies ------------------------------------------------------------------------

@pytest.mark.parametrize("op,body,reason", [
    ("migrate-disk-and-power-off", {"dest": 5}, "body.dest: Input should be a valid string"),
    ("migrate-disk-and-power-off", {}, "body.dest: Field required"),
    ("migrate-disk-and-power-off", {"dest": "h2", "timeout": "30"}, "body.timeout: Input should be a valid integer"),
    ("migrate-disk-and-power-off", {"dest": "h2", "timeout": -1}, "body.timeout: Input should be greater than"),
    ("migrate-disk-and-power-off", {"dest": "h2", "flavor": {**FLAVOR, "vcpus": "two"}},
     "body.flavor.vcpus: Input should be a valid integer"),
    ("migrate-disk-and-power-off", {"dest": "h2", "dst": "x"}, "body.dst: Extra inputs are not permitted"),
    ("finish-migration", {"name": "vm1", "disk_info": "[]", "migration": MIGRATION}, "body.flavor: Field required"),
    ("finish-migration", {"name": "vm1", "flavor": FLAVOR, "disk_info": "[{oops", "migration": MIGRATION},
     "body.disk_info: Value error, not a JSON list of disks"),
    ("finish-migration", {"name": "vm1", "flavor": FLAVOR, "disk_info": '[{"size": 1}]', "migration": MIGRATION},
     "body.disk_info: Value error, not a JSON list of disks"),
    ("finish-revert-migration", {"power_on": 1}, "body.power_on: Input should be a valid boolean"),
    ("destroy", ["x"], "the body must be a JSON object"),
])
def test_malformed_body_is_400_naming_the_field(cloud, op, body, reason):
    src, _ = cloud
    r = src.client.post(f"/v1/instances/{UUID}/{op}", json=body)
    assert r.status_code == 400
    assert reason in r.json()["detail"]
    assert src.client.get("/v1/jobs").json() == {"jobs": []}


def test_invalid_json_is_400(cloud):
    src, _ = cloud
    r = src.client.post(f"/v1/instances/{UUID}/power-off", content=b'{"timeout": ',
                        headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["detail"].startswith("the body is not valid JSON (Expecting value at character")
    assert src.driver.get_instance(UUID).power_state == PowerState.RUNNING


# -- jobs ------------------------------------------------------------------------------------------

def test_power_off_and_on_jobs(cloud):
    src, _ = cloud
    off = src.job("power-off", {"timeout": 5})
    assert (off["op"], off["state"], off["instance_uuid"]) == ("power-off", "done", UUID)
    assert src.client.get(f"/v1/instances/{UUID}").json()["state"] == "shutdown"
    assert src.job("power-on")["state"] == "done"
    assert src.client.get(f"/v1/instances/{UUID}").json()["state"] == "running"
    assert [j["op"] for j in src.client.get("/v1/jobs").json()["jobs"]] == ["power-on", "power-off"]


def test_progress_is_visible_while_the_copy_runs(cloud, gate):
    src, _ = cloud
    r = src.client.post(f"/v1/instances/{UUID}/migrate-disk-and-power-off", json={"dest": "h2"})
    assert r.status_code == 202 and r.json()["state"] == "running"
    gate.step()  # step 1 of 4 sleeps, then reports
    gate.arrived.acquire(timeout=WAIT)  # step 2 sleeps: step 1's progress is in
    job = src.client.get(f"/v1/jobs/{r.json()['id']}").json()
    assert job["state"] == "running"
    assert job["progress"] == {"file": "disk", "done": 10 * GiB // 4, "total": 10 * GiB,
                               "rate": pytest.approx(job["progress"]["rate"]), "eta": job["progress"]["eta"],
                               "fraction": 0.25}
    gate.open()
    done = src.wait(r.json()["id"])
    assert done["state"] == "done" and done["progress"]["fraction"] == 1.0


class HoldAtStep:
    """An injectable sleep that lets each copying thread through ``step - 1`` steps, then holds it."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.steps: dict[int, int] = {}
        self.changed = threading.Condition()
        self.go = threading.Event()

    def sleep(self, seconds: float) -> None:
        with self.changed:
            n = self.steps[threading.get_ident()] = self.steps.get(threading.get_ident(), 0) + 1
            self.changed.notify_all()
        if n >= self.step:
            self.go.wait(WAIT)

    def wait_held(self, threads: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: sum(n >= self.step for n in self.steps.values()) == threads, WAIT)


def test_progress_of_two_migrations_at_once_lands_on_each_ones_job(cloud):
    src, _ = cloud
    hold = HoldAtStep(2)  # each copy reports its step 1, then waits
    src.driver.sleep = hold.sleep
    other = "9a1c0f7e-0000-4000-8000-000000000002"
    src.driver.add_instance(other, "vm2", SMALL, disks={"vm2-disk": 4 * GiB})
    ids = [src.client.post(f"/v1/instances/{uuid}/migrate-disk-and-power-off", json={"dest": "h2"}).json()["id"]
           for uuid in (UUID, other)]
    try:
        hold.wait_held(2)
        mine, theirs = (src.client.get(f"/v1/jobs/{i}").json()["progress"] for i in ids)
    finally:
        hold.go.set()
    assert (mine["file"], mine["done"], mine["total"]) == ("disk", 10 * GiB // 4, 10 * GiB)
    assert (theirs["file"], theirs["done"], theirs["total"]) == ("vm2-disk", GiB, 4 * GiB)
    done = [src.wait(i) for i in ids]
    assert [(j["instance_uuid"], j["progress"]["file"], j["progress"]["fraction"]) for j in done] == [
        (UUID, "disk", 1.0), (other, "vm2-disk", 1.0)]
    assert [j["result"]["bytes_sent"] for j in done] == [10 * GiB, 4 * GiB]


def test_second_op_on_a_busy_instance_is_409(cloud, gate):
    src, _ = cloud
    first = src.client.post(f"/v1/instances/{UUID}/migrate-disk-and-power-off", json={"dest": "h2"}).json()
    gate.arrived.acquire(timeout=WAIT)  # the copy is under way
    for op, body in (("power-on", {}), ("finish-revert-migration", {})):
        r = src.client.post(f"/v1/instances/{UUID}/{op}", json=body)
        assert r.status_code == 409
        assert f"already has a running job {first['id']}" in r.json()["detail"]
    gate.open()
    assert src.wait(first["id"])["state"] == "done"


def test_a_repeated_job_id_returns_the_same_job_and_calls_the_driver_once(cloud, gate):
    src, dst = cloud
    calls = []
    src.driver.migrate_disk_and_power_off = _counting(src.driver.migrate_disk_and_power_off, calls)
    body = {"dest": "h2", "job_id": "m7-migrate"}
    first = src.client.post(f"/v1/instances/{UUID}/migrate-disk-and-power-off", json=body)
    again = src.client.post(f"/v1/instances/{UUID}/migrate-disk-and-power-off", json=body)
    assert (first.status_code, again.status_code) == (202, 202)
    assert first.json()["id"] == again.json()["id"] == "m7-migrate" and again.json()["state"] == "running"
    gate.open()
    assert src.wait("m7-migrate")["state"] == "done"
    late = src.client.post(f"/v1/instances/{UUID}/migrate-disk-and-power-off", json=body)
    assert late.status_code == 202 and late.json() == src.client.get("/v1/jobs/m7-migrate").json()
    assert late.json()["state"] == "done" and len(calls) == 1
    assert [j["id"] for j in src.client.get("/v1/jobs").json()["jobs"]] == ["m7-migrate"]


def test_a_repeated_job_id_finds_its_job_after_the_instance_left(cloud, gate):
    src, _ = cloud
    gate.open()
    job = src.job("live-migrate", {"dest": "h2", "job_id": "live-1"})
    assert job["state"] == "done"
    assert src.client.get(f"/v1/instances/{UUID}").status_code == 404  # gone from here
    r = src.client.post(f"/v1/instances/{UUID}/live-migrate", json={"dest": "h2", "job_id": "live-1"})
    assert (r.status_code, r.json()["id"], r.json()["state"]) == (202, "live-1", "done")


@pytest.mark.parametrize("other", ["power-on", "destroy"])
def test_a_job_id_used_for_another_operation_is_409(cloud, other):
    src, _ = cloud
    assert src.job("power-off", {"job_id": "j1"})["state"] == "done"
    r = src.client.post(f"/v1/instances/{UUID}/{other}", json={"job_id": "j1"})
    assert r.status_code == 409
    assert r.json()["detail"] == (f"job j1 is power-off on instance {UUID}, not {other} on instance {UUID}; "
                                  "name a new job for a different operation")


def test_a_job_id_used_on_another_instance_is_409(cloud):
    src, _ = cloud
    src.driver.add_instance("vm2-uuid", "vm2", SMALL, PowerState.SHUTDOWN)
    assert src.job("power-off", {"job_id": "j1"})["state"] == "done"
    r = src.client.post("/v1/instances/vm2-uuid/power-off", json={"job_id": "j1"})
    assert r.status_code == 409 and "not power-off on instance vm2-uuid" in r.json()["detail"]


def test_a_new_job_id_on_a_busy_instance_is_409(cloud, gate):
    src, _ = cloud
    first = src.client.post(f"/v1/instances/{UUID}/migrate-disk-and-power-off",
                            json={"dest": "h2", "job_id": "a"}).json()
    gate.arrived.acquire(timeout=WAIT)
    r = src.client.post(f"/v1/instances/{UUID}/power-on", json={"job_id": "b"})
    assert r.status_code == 409 and f"already has a running job {first['id']}" in r.json()["detail"]
    gate.open()
    assert src.wait("a")["state"] == "done"


def _counting(method: Any, calls: list[Any]) -> Any:
    def counted(*args: Any, **kw: Any) -> Any:
        calls.append(args)
        return method(*args, **kw)
    return counted


def test_cold_migration_through_two_agents_and_confirm(cloud, gate):
    src, dst = cloud
    before = time.time()
    job = migrate(src, gate, {"dest": "198.18.0.12", "timeout": 1, "retry_interval": 1})
    assert job["state"] == "done", job
    result = job["result"]
    assert result["shared"] is False and result["precopy"] is False and result["was_running"] is True
    assert before <= result["powered_off_at"] <= time.time()
    assert [(c["method"], c["size"], c["sent"]) for c in result["copies"]] == [("memory", 10 * GiB, 10 * GiB)]
    assert set(result["copies"][0]) == {"method", "size", "sent", "wire", "skipped", "resumed", "seconds", "digest"}
    assert (result["bytes_sent"], result["bytes_skipped"], result["digests"]) == (
        10 * GiB, 0, [result["copies"][0]["digest"]])
    assert src.client.get(f"/v1/instances/{UUID}").json()["state"] == "shutdown"

    done = finish(dst, result["disk_info"])
    assert done["state"] == "done" and before <= done["result"]["running_at"] <= time.time()
    moved = dst.client.get(f"/v1/instances/{UUID}").json()
    assert (moved["host"], moved["state"]) == ("h2", "running")

    assert src.job("confirm-migration", {"migration": MIGRATION})["state"] == "done"
    assert src.client.get("/v1/instances").json() == {"instances": []}
    assert src.client.get("/v1/host").json()["disk_gb_used"] == 0
    assert dst.client.get("/v1/host").json()["disk_gb_used"] == 10


def test_cold_migration_with_a_bigger_flavor_grows_the_disk(cloud, gate):
    src, dst = cloud
    big = {**FLAVOR, "name": "big", "root_gb": 20}
    job = migrate(src, gate, {"dest": "h2", "flavor": big})
    finish(dst, job["result"]["disk_info"], flavor=big, resize_instance=True, power_on=False)
    moved = dst.client.get(f"/v1/instances/{UUID}").json()
    assert moved["flavor"] == big and moved["state"] == "shutdown"
    assert dst.driver.disks(UUID) == {"disk": 20 * GiB}


def test_revert_destroys_the_copy_and_restarts_the_source(cloud, gate):
    src, dst = cloud
    job = migrate(src, gate)
    finish(dst, job["result"]["disk_info"])
    assert dst.job("destroy", {"destroy_disks": True})["state"] == "done"
    assert dst.client.get("/v1/instances").json() == {"instances": []} and dst.driver.disks(UUID) == {}
    assert src.job("finish-revert-migration", {"migration": MIGRATION, "power_on": True})["state"] == "done"
    assert src.client.get(f"/v1/instances/{UUID}").json()["state"] == "running"
    assert src.driver.disks(UUID) == {"disk": 10 * GiB}


def test_destroy_can_keep_disks(cloud):
    src, _ = cloud
    src.job("destroy", {"destroy_disks": False})
    assert src.client.get(f"/v1/instances/{UUID}").status_code == 404
    assert src.driver.disks(UUID) == {"disk": 10 * GiB}


def test_driver_error_ends_the_job_in_error_with_its_message(cloud, gate):
    src, _ = cloud
    src.driver.fail("copy", OSError("connection reset by h2"))
    job = migrate(src, gate)
    assert job["state"] == "error" and job["result"] is None and job["ended_at"]
    assert job["error"]["kind"] == "MigrationFailed"
    assert "connection reset by h2" in job["error"]["message"]
    assert "restored and started again" in job["error"]["message"]
    assert src.client.get(f"/v1/instances/{UUID}").json()["state"] == "running"


def test_refusals_before_power_off_are_job_errors(cloud, gate):
    src, _ = cloud
    job = migrate(src, gate, {"dest": "h2", "flavor": {**FLAVOR, "root_gb": 5}})
    assert job["error"]["kind"] == "ResizeDown" and "root_gb >= 10" in job["error"]["message"]
    src.driver.add_instance(UUID, "vm1", SMALL, power_state=PowerState.PAUSED)
    job = migrate(src, gate)
    assert job["error"]["kind"] == "InvalidInstanceState" and "paused" in job["error"]["message"]


def test_finish_without_a_copy_is_a_job_error(cloud):
    _, dst = cloud
    job = finish(dst, "[]")
    assert job["state"] == "error" and "copied domain definition" in job["error"]["message"]


def test_live_migrate_job(cloud, gate):
    src, dst = cloud
    gate.open()
    job = src.job("live-migrate", {"dest": "h2"})
    assert job["state"] == "done" and isinstance(job["result"]["downtime_s"], float)
    assert job["result"]["shared"] is False and job["result"]["migration_s"] >= job["result"]["downtime_s"]
    assert job["progress"] == {**job["progress"], "file": "disk", "fraction": 1.0}
    assert dst.client.get(f"/v1/instances/{UUID}").json()["state"] == "running"
    assert src.client.get("/v1/instances").json() == {"instances": []}


class RefusingDriver(MemoryDriver):
    live_migration = ComputeDriver.live_migration  # the contract's refusal


def test_live_migrate_without_driver_support_is_a_clear_job_error():
    drv = RefusingDriver("h1")
    drv.add_instance(UUID, "vm1", SMALL)
    job = Host(drv).job("live-migrate", {"dest": "h2"})
    assert job["state"] == "error" and job["error"]["kind"] == "DriverError"
    assert "live migration is not supported by the QEMU driver; use a cold migration" in job["error"]["message"]
    assert drv.get_instance(UUID).power_state == PowerState.RUNNING


# -- copy figures in the migrate job's result ----------------------------------------------

def test_migrate_result_without_precopy_counts_every_byte_after_the_power_off(cloud, gate):
    src, _ = cloud
    job = migrate(src, gate)
    result = job["result"]
    sent = sum(c["sent"] for c in result["copies"])
    assert sent > 0 and result["precopy"] is False
    assert (result["bytes_before_power_off"], result["bytes_after_power_off"]) == (0, sent)


def test_migrate_result_carries_the_drivers_precopy_figures(cloud, gate, monkeypatch):
    src, _ = cloud
    real = src.driver.migrate_disk_and_power_off

    def precopied(*args, **kw):
        return dataclasses.replace(real(*args, **kw), precopy=True, bytes_before_power_off=10 * GiB - (3 << 20))
    monkeypatch.setattr(src.driver, "migrate_disk_and_power_off", precopied)
    result = migrate(src, gate)["result"]
    assert (result["precopy"], result["bytes_before_power_off"], result["bytes_after_power_off"]) == (
        True, 10 * GiB - (3 << 20), 3 << 20)


def test_job_results_parse_with_the_result_models_the_controller_uses(cloud, gate):
    src, dst = cloud
    gate.open()
    live = src.job("live-migrate", {"dest": "h2"})
    migrated = dst.job("migrate-disk-and-power-off", {"dest": "h1"})  # and back, cold
    finished = finish(src, migrated["result"]["disk_info"], power_on=False)
    for job, model in ((migrated, schemas.MigrateResult), (finished, schemas.FinishResult),
                       (live, schemas.LiveResult)):
        assert job["state"] == "done", job
        parsed = schemas.parse_result(job["op"], job["result"])
        assert isinstance(parsed, model) and parsed.model_dump(mode="json") == job["result"]
    assert finished["result"]["running_at"] is None  # power_on false: it never ran here
    assert [p["phase"] for p in finished["result"]["phases"]] == ["define"]   # and was not started
    assert schemas.parse_result("power-on", None) is None
    assert migrated["result"]["disk_info"] == schemas.MigrateResult.model_validate(migrated["result"]).disk_info


INJECTED = "198.18.0.12/system?known_hosts_verify=ignore&known_hosts=/dev/null#"


@pytest.mark.parametrize("op", ["live-migrate", "migrate-disk-and-power-off"])
@pytest.mark.parametrize("dest", [INJECTED, "root@198.18.0.12", "198.18.0.12:22", "h2?command=sh", "-oProxyCommand=x",
                                  "h2 h3", "", "[fd00::12]"])
def test_dest_that_is_not_a_host_name_or_address_is_refused_before_any_job(cloud, op, dest):
    src, _ = cloud
    r = src.client.post(f"/v1/instances/{UUID}/{op}", json={"dest": dest})
    assert r.status_code == 400 and "host name or an IP address" in r.json()["detail"]
    assert src.client.get("/v1/jobs").json() == {"jobs": []}


# -- reading a job with a long poll -----------------------------------------------------


def test_a_job_read_with_wait_is_answered_when_the_job_ends(cloud, gate):
    src, _dst = cloud
    r = src.client.post(f"/v1/instances/{UUID}/migrate-disk-and-power-off", json={"dest": "198.18.0.12"})
    job_id = r.json()["id"]
    held = src.client.get(f"/v1/jobs/{job_id}", params={"wait": 0.05}).json()
    assert held["state"] == "running"            # still copying (the gate holds it): answered at the wait's end
    threading.Timer(0.1, gate.open).start()
    ended = src.client.get(f"/v1/jobs/{job_id}", params={"wait": 20}).json()
    assert ended["state"] == "done" and ended["result"]["disk_info"]


@pytest.mark.parametrize("wait", ["-1", "31", "soon"])
def test_a_job_read_with_a_wait_out_of_bounds_is_refused(cloud, wait):
    src, _dst = cloud
    job = src.job("power-off", {"job_id": "j1"})
    r = src.client.get(f"/v1/jobs/{job['id']}", params={"wait": wait})
    assert r.status_code == 400 and "wait" in r.text


def test_a_job_read_with_wait_of_an_unknown_job_is_404(cloud):
    src, _dst = cloud
    assert src.client.get("/v1/jobs/nope", params={"wait": 1}).status_code == 404
