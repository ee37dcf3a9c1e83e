"""AgentClient against a played agent (httpx.MockTransport), a real closed port and a FastAPI app."""

from __future__ import annotations

from agent import schemas as s

import json
import socket

import httpx
import pytest
from fastapi import FastAPI, Header, HTTPException
from fastapi.testclient import TestClient

from agent.schemas import FinishResult, HostOut, InstanceOut, JobOut, MigrateResult
from controller.agents import AgentClient
from controller.errors import AgentError

BASE = "http://198.18.0.11:8797"
TOKEN = "agent-token"


class PlayedAgent:
    """Answers like an agent: a fixed table of (method, path) -> (status, body), whatever the query
    string (an agent without the long poll ignores ``wait``); logs requests."""

    def __init__(self, answers: dict[tuple[str, str], tuple[int, object]]) -> None:
        self.answers = answers
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return httpx.Response(401, json={"detail": "missing or wrong token"})
        key = (request.method, request.url.raw_path.decode().partition("?")[0])
        if key not in self.answers:
            return httpx.Response(404, json={"detail": f"{key[1]} not found"})
        status, body = self.answers[key]
        answer = body() if callable(body) else body
        if isinstance(answer, str):
            return httpx.Response(status, text=answer)
        return httpx.Response(status, json=answer)


def client(agent: PlayedAgent, token: str = TOKEN, **kw) -> AgentClient:
    http = httpx.Client(base_url=BASE, transport=httpx.MockTransport(agent))
    return AgentClient("compute1", BASE, token, http=http, **kw)


def job(state: str, done: int = 0, op: str = "migrate-disk-and-power-off", **extra) -> dict:
    return {"id": "j1", "op": op, "instance_uuid": "u1", "state": state,
            "progress": {"file": "disk", "done": done, "total": 10, "rate": 1.0, "eta": None, "fraction": done / 10},
            "result": None, "error": None, "started_at": "2026-11-23T11:40:00Z", "ended_at": None, **extra}


HOST = {"hostname": "compute1", "address": "198.18.0.11", "arch": "x86_64", "hypervisor_type": "QEMU",
        "hypervisor_version": 8002000, "vcpus": 8, "vcpus_used": 2, "memory_mb": 16384, "memory_mb_used": 2048,
        "disk_gb": 500, "disk_gb_used": 40, "instances": 1, "extra": {}}
INST = {"uuid": "u1", "name": "web1", "host": "compute1", "power_state": 1, "state": "running",
        "flavor": {"name": "small", "vcpus": 1, "memory_mb": 512, "root_gb": 1, "ephemeral_gb": 0}}
MIGRATED = {"disk_info": "[]", "copies": [{"method": "stream", "size": 100, "sent": 60, "wire": 40, "skipped": 40,
                                           "resumed": 0, "seconds": 2.0, "digest": "xxh3:ab"}],
            "shared": False, "precopy": False, "was_running": True, "powered_off_at": 1.5,
            "bytes_before_power_off": 0, "bytes_after_power_off": 60, "bytes_sent": 60, "bytes_skipped": 40,
            "rate": 30.0, "digests": ["xxh3:ab"]}


def test_reads_host_instances_and_one_instance_as_the_agents_models():
    agent = PlayedAgent({("GET", "/v1/host"): (200, HOST),
                         ("GET", "/v1/instances"): (200, {"instances": [INST]}),
                         ("GET", "/v1/instances/u1"): (200, INST)})
    c = client(agent)
    host = c.host()
    assert isinstance(host, HostOut) and (host.address, host.vcpus) == ("198.18.0.11", 8)
    assert c.instances() == [InstanceOut.model_validate(INST)]
    inst = c.instance("u1")
    assert isinstance(inst, InstanceOut) and (inst.power_state, inst.flavor.memory_mb) == (1, 512)
    assert c.instance("nope") is None
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in agent.requests)


@pytest.mark.parametrize("path, body, call, text", [
    ("/v1/host", {"hostname": "compute1", "address": "198.18.0.11"}, lambda c: c.host(),
     "/v1/host answered with a HostOut that does not fit (arch: Field required"),
    ("/v1/instances", {"instances": [{**INST, "power_state": "on"}]}, lambda c: c.instances(),
     "/v1/instances answered with a InstancesOut that does not fit (instances.0.power_state"),
    ("/v1/instances", {"instances": [{**INST, "power_state": 9}]}, lambda c: c.instances(),
     "/v1/instances answered with power state 9 of instance u1, which is none of"),
    ("/v1/jobs/j1", {"id": "j1"}, lambda c: c.job("j1"), "/v1/jobs/j1 answered with a JobOut that does not fit"),
    ("/v1/jobs/j1", job("done", result={"disk_info": "[]"}), lambda c: c.job("j1"),
     "/v1/jobs/j1 answered with a migrate-disk-and-power-off result that does not fit (copies: Field required"),
])
def test_a_reply_that_does_not_fit_names_the_url(path, body, call, text):
    with pytest.raises(AgentError) as e:
        call(client(PlayedAgent({("GET", path): (200, body)})))
    assert f"http://198.18.0.11:8797{text}" in str(e.value), str(e.value)
    assert "same coldferry version" in str(e.value) or "none of" in str(e.value)
    assert e.value.status == 502 and e.value.agent_status is None


def test_a_done_job_carries_its_ops_result_model():
    agent = PlayedAgent({("GET", "/v1/jobs/j1"): (200, job("done", 10, result=MIGRATED)),
                         ("GET", "/v1/jobs/j2"): (200, job("done", op="finish-migration",
                                                           result={"running_at": 5.0})),
                         ("GET", "/v1/jobs/j3"): (200, job("done", op="power-on", result={"ignored": 1}))})
    c = client(agent)
    migrated = c.job("j1").result
    assert isinstance(migrated, MigrateResult)
    assert (migrated.bytes_sent, migrated.rate, migrated.digests) == (60, 30.0, ["xxh3:ab"])
    assert c.job("j2").result == FinishResult(running_at=5.0)
    assert c.job("j3").result is None   # power-on has no result


def test_start_posts_the_body_and_returns_the_job():
    agent = PlayedAgent({("POST", "/v1/instances/u1/migrate-disk-and-power-off"): (202, job("running"))})
    got = client(agent).start("u1", "migrate-disk-and-power-off", s.MigrateRequest(dest="198.18.0.12"))
    assert isinstance(got, JobOut) and (got.id, got.state, got.result) == ("j1", "running", None)
    assert json.loads(agent.requests[0].content) == {"dest": "198.18.0.12"}


def test_ids_cannot_change_the_path():
    agent = PlayedAgent({})
    c = client(agent)
    assert c.instance("../jobs/x") is None
    assert agent.requests[-1].url.raw_path == b"/v1/instances/..%2Fjobs%2Fx"
    with pytest.raises(ValueError, match="not an instance or job id"):
        c.job("..")
    with pytest.raises(ValueError, match="not a path word"):
        c.start("u1", "power-on/../../destroy", s.PowerOnRequest())


def test_refused_token_names_the_setting_to_fix():
    with pytest.raises(AgentError) as e:
        client(PlayedAgent({}), token="wrong").host()
    msg = str(e.value)
    assert msg.startswith("agent of host compute1: http://198.18.0.11:8797/v1/host refused the token (401 ")
    assert "check agent_token for host compute1" in msg
    assert e.value.status == 502 and e.value.agent_status == 401  # the controller's caller is not at fault


@pytest.mark.parametrize("status", [404, 409, 400])
def test_client_errors_pass_the_detail_and_status_through(status):
    agent = PlayedAgent({("POST", "/v1/instances/u1/power-on"): (status, {"detail": "instance u1 is paused"})})
    with pytest.raises(AgentError) as e:
        client(agent).start("u1", "power-on", s.PowerOnRequest())
    assert str(e.value) == "agent of host compute1: instance u1 is paused"
    assert e.value.status == e.value.agent_status == status


def test_server_errors_point_at_the_agent_log():
    agent = PlayedAgent({("GET", "/v1/instances"): (500, "Internal Server Error")})
    with pytest.raises(AgentError) as e:
        client(agent).instances()
    assert "GET http://198.18.0.11:8797/v1/instances failed with 500: Internal Server Error; see the agent's log" \
        in str(e.value)
    assert e.value.status == 502


def test_a_non_json_answer_means_a_wrong_url():
    agent = PlayedAgent({("GET", "/v1/host"): (200, "<html>router login</html>")})
    with pytest.raises(AgentError, match="answered 200 without JSON: check that agent_url of host compute1"):
        client(agent).host()


def test_connection_refused_on_a_closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens there now: the real client gets a real refusal.
    with AgentClient("compute1", f"http://127.0.0.1:{port}/", TOKEN, timeout=2.0, retry_seconds=0) as c:
        with pytest.raises(AgentError) as e:
            c.host()
    msg = str(e.value)
    assert f"cannot reach http://127.0.0.1:{port}/v1/host" in msg
    assert "agent_url of host compute1 is right" in msg and e.value.agent_status is None


def test_timeout_says_which_setting_to_raise():
    def hang(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    c = AgentClient("compute1", BASE, TOKEN, timeout=3.0, retry_seconds=0,
                    http=httpx.Client(base_url=BASE, transport=httpx.MockTransport(hang)))
    with pytest.raises(AgentError, match=r"no answer from http://198.18.0.11:8797/v1/jobs/j1 within 3.0 s.*"
                                         r"raise agent_timeout"):
        c.job("j1")


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def clock(self) -> float:
        return self.now


def test_wait_polls_until_the_job_ends():
    states = iter([job("running", 2), job("running", 6), job("done", 10, result=MIGRATED)])
    agent = PlayedAgent({("GET", "/v1/jobs/j1"): (200, lambda: next(states))})
    t = FakeTime()
    seen: list[int] = []
    final = client(agent, sleep=t.sleep, clock=t.clock, poll_interval=0.5).wait(
        "j1", on_update=lambda j: seen.append(j.progress.done))
    assert final.state == "done" and final.result == MigrateResult.model_validate(MIGRATED)
    assert seen == [2, 6, 10]
    # Each question may be held poll_interval; this agent answered at once, so the client paused instead.
    assert [r.url.params["wait"] for r in agent.requests] == ["0.500"] * 3
    assert t.sleeps == [0.5, 0.5]


def test_wait_on_a_long_polling_agent_asks_again_at_once_and_sees_the_end_when_it_comes():
    t = FakeTime()
    states = iter([job("running", 2), job("running", 6), job("done", 10, result=MIGRATED)])

    def held(request: httpx.Request) -> dict:
        answer = next(states)
        # The agent holds the question until the job ends or the wait is over.
        t.now += 0.3 if answer["state"] == "done" else float(request.url.params["wait"])
        return answer

    agent = PlayedAgent({("GET", "/v1/jobs/j1"): (200, None)})
    agent.answers[("GET", "/v1/jobs/j1")] = (200, lambda: held(agent.requests[-1]))
    seen: list[int] = []
    final = client(agent, sleep=t.sleep, clock=t.clock, poll_interval=1.0).wait(
        "j1", on_update=lambda j: seen.append(j.progress.done))
    assert final.state == "done" and seen == [2, 6, 10]
    assert t.sleeps == [] and t.now == pytest.approx(2.3)   # the end seen 0.3 s after the last question


def test_wait_holds_no_longer_than_half_the_request_timeout_nor_past_its_deadline():
    agent = PlayedAgent({("GET", "/v1/jobs/j1"): (200, job("running"))})
    t = FakeTime()
    with pytest.raises(AgentError, match="still running after 5 s"):
        client(agent, sleep=t.sleep, clock=t.clock, poll_interval=3.0, timeout=4.0).wait("j1", timeout=5)
    assert [r.url.params.get("wait") for r in agent.requests] == ["2.000", "2.000", None]
    assert t.sleeps == [3.0, 2.0]   # the agent answered at once: paused poll_interval, then up to the deadline


def test_job_without_wait_asks_without_a_query():
    agent = PlayedAgent({("GET", "/v1/jobs/j1"): (200, job("running"))})
    client(agent).job("j1")
    assert agent.requests[-1].url.raw_path == b"/v1/jobs/j1"


def test_wait_returns_a_failed_job_without_raising():
    failed = job("error", error={"kind": "PowerOffFailed", "message": "guest ignored ACPI"})
    agent = PlayedAgent({("GET", "/v1/jobs/j1"): (200, failed)})
    assert client(agent, sleep=FakeTime().sleep).wait("j1").error.kind == "PowerOffFailed"


def test_wait_gives_up_after_its_timeout():
    agent = PlayedAgent({("GET", "/v1/jobs/j1"): (200, job("running"))})
    t = FakeTime()
    with pytest.raises(AgentError, match="job j1 .migrate-disk-and-power-off. still running after 2.5 s"):
        client(agent, sleep=t.sleep, clock=t.clock, poll_interval=1.0).wait("j1", timeout=2.5)
    assert t.sleeps == [1.0, 1.0, 0.5]  # the last sleep stops at the deadline


def test_wait_on_a_job_the_agent_lost():
    with pytest.raises(AgentError) as e:
        client(PlayedAgent({}), sleep=FakeTime().sleep).wait("j9")
    assert "job j9 is unknown to http://198.18.0.11:8797: the agent restarted" in str(e.value)
    assert e.value.status == e.value.agent_status == 404


def test_relative_paths_on_a_fastapi_test_client():
    app = FastAPI()

    @app.get("/v1/host")
    def host(authorization: str = Header("")) -> dict:
        if authorization != f"Bearer {TOKEN}":
            raise HTTPException(401, "missing or wrong token")
        return HOST

    with TestClient(app) as http:
        assert AgentClient("compute1", "http://testserver", TOKEN, http=http).host().hostname == "compute1"
        with pytest.raises(AgentError, match="refused the token"):
            AgentClient("compute1", "http://testserver", "bad", http=http).host()


class Flaky:
    """A played agent behind a link that drops the first ``drops`` requests."""

    def __init__(self, agent: PlayedAgent, drops: int, error: type[httpx.TransportError] = httpx.ConnectError) -> None:
        self.agent, self.drops, self.error, self.sent = agent, drops, error, 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.sent += 1
        if self.sent <= self.drops:
            raise self.error("link down", request=request)
        return self.agent(request)


def flaky_client(link: Flaky, t: FakeTime, retry_seconds: float = 30.0) -> AgentClient:
    http = httpx.Client(base_url=BASE, transport=httpx.MockTransport(link))
    return AgentClient("compute1", BASE, TOKEN, http=http, sleep=t.sleep, clock=t.clock, retry_seconds=retry_seconds)


@pytest.mark.parametrize("call, answers", [
    (lambda c: c.host(), {("GET", "/v1/host"): (200, HOST)}),
    (lambda c: c.instances(), {("GET", "/v1/instances"): (200, {"instances": [INST]})}),
    (lambda c: c.instance("u1"), {("GET", "/v1/instances/u1"): (200, INST)}),
    (lambda c: c.job("j1"), {("GET", "/v1/jobs/j1"): (200, job("running"))}),
    (lambda c: c.start("u1", "power-on", s.PowerOnRequest(job_id="m-power-on-1")),
     {("POST", "/v1/instances/u1/power-on"): (202, job("running", op="power-on"))}),
    (lambda c: c.wait("j1"), {("GET", "/v1/jobs/j1"): (200, job("done", op="power-on"))}),
])
def test_every_call_is_retried_with_backoff_while_the_agent_cannot_be_reached(call, answers):
    t = FakeTime()
    link = Flaky(PlayedAgent(answers), drops=3, error=httpx.ConnectError)
    assert call(flaky_client(link, t)) is not None
    assert link.sent == 4 and len(t.sleeps) == 3 and t.sleeps == sorted(t.sleeps)   # growing waits


def test_timeouts_are_retried_too_then_the_call_gives_up_unreachable():
    from controller.errors import AgentUnreachable
    t = FakeTime()
    link = Flaky(PlayedAgent({}), drops=10_000, error=httpx.ReadTimeout)
    with pytest.raises(AgentUnreachable, match="no answer from"):
        flaky_client(link, t, retry_seconds=20.0).host()
    assert 20.0 <= t.now < 30.0 and link.sent > 2


def test_an_http_answer_is_never_retried():
    t = FakeTime()
    link = Flaky(PlayedAgent({("GET", "/v1/host"): (500, {"detail": "boom"})}), drops=0)
    with pytest.raises(AgentError, match="failed with 500"):
        flaky_client(link, t).host()
    assert link.sent == 1 and t.sleeps == []
