"""The controller's client of one host's agent (the agent API of docs/api.md)."""

from __future__ import annotations

import functools
import json
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import httpx
import pydantic
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_exponential

from agent.jobs import MAX_JOB_WAIT
from agent.schemas import HostOut, InstanceOut, InstancesOut, JobOut, parse_result
from driver.model import PowerState

from .errors import AgentError, AgentUnreachable

M = TypeVar("M", bound=pydantic.BaseModel)
_POWER_STATES = frozenset(PowerState)

# An operation is a path word of the agent API; nothing else may reach the URL.
_OP = re.compile(r"^[a-z][a-z-]*$")


class AgentClient:
    """Calls one agent over HTTP with its bearer token.

    ``http`` is an httpx.Client to send through (tests pass a FastAPI
    TestClient); without one the client opens its own on ``base_url`` with
    ``timeout`` seconds per request. An ``https://`` agent's certificate must
    be signed by the CA in ``ca_file`` (None: the system's trust store) and
    name the URL's host; ``client_cert`` (certificate file, key file) is shown
    to an agent that asks for one. ``sleep`` and ``clock`` pace wait() and
    the retries.

    Every request that gets no answer (a transport error or a timeout; not an
    HTTP answer, whatever its code) is sent again with exponential backoff for
    up to ``retry_seconds`` (0: once); then it raises AgentUnreachable.
    Every method raises AgentError: for transport problems, timeouts, a
    refused token and 5xx answers with a reason naming the URL and the fix;
    for other 4xx answers with the agent's ``detail`` as reason and the
    agent's code as ``status`` (so callers can map 404 and 409).
    ``agent_status`` holds the agent's code, None when it did not answer.
    Replies are parsed with the agent's own models (agent.schemas); one
    that does not fit is an AgentError naming the URL.
    """

    def __init__(self, host_name: str, base_url: str, token: str, http: httpx.Client | None = None,
                 timeout: float = 10.0, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, poll_interval: float = 1.0,
                 retry_seconds: float = 15.0, ca_file: str | None = None,
                 client_cert: tuple[str, str] | None = None) -> None:
        self.host_name = host_name
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.retry_seconds = retry_seconds
        self.ca_file = ca_file
        self.client_cert = client_cert
        self._headers = {"Authorization": f"Bearer {token}"}
        self._own = http is None
        self._http = http if http is not None else httpx.Client(
            base_url=self.base_url, timeout=timeout, verify=tls_context(ca_file, client_cert))
        self._sleep = sleep
        self._clock = clock

    def close(self) -> None:
        """Close the HTTP client if this object opened it."""
        if self._own:
            self._http.close()

    def __enter__(self) -> "AgentClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host(self) -> HostOut:
        """The host's resources plus its data-plane ``address``."""
        return self._get(HostOut, "/v1/host")

    def instances(self) -> list[InstanceOut]:
        path = "/v1/instances"
        found = self._get(InstancesOut, path).instances
        for inst in found:
            self._check_power_state(inst, path)
        return found

    def instance(self, uuid: str) -> InstanceOut | None:
        """The instance, or None when the agent does not know it."""
        path = f"/v1/instances/{_quote(uuid)}"
        data = self._call("GET", path, missing_ok=True)
        return None if data is None else self._check_power_state(self._parse(InstanceOut, data, path), path)

    def start(self, uuid: str, op: str, body: pydantic.BaseModel) -> JobOut:
        """Start job ``op`` (a path word such as ``migrate-disk-and-power-off``) on instance
        ``uuid`` with ``body``, the op's request model of agent/schemas.py (only the fields
        set are sent, so the agent's defaults apply to the others); return the job as the
        agent accepted it. Raises ValueError for an op that is not a path word."""
        if not _OP.match(op):
            raise ValueError(f"agent operation {op!r} is not a path word such as power-on")
        path = f"/v1/instances/{_quote(uuid)}/{op}"
        return self._job(self._call("POST", path, body=body.model_dump(mode="json", exclude_unset=True)), path)

    def job(self, job_id: str, wait: float = 0.0) -> JobOut | None:
        """The job, or None when the agent does not know it (e.g. it restarted). A done job's
        ``result`` is its op's result model (agent.schemas.RESULTS), None for the other ops.
        With ``wait`` (seconds), the agent holds the answer while the job runs, up to that long:
        it answers as soon as the job ends (an agent without the long poll answers at once)."""
        path = f"/v1/jobs/{_quote(job_id)}"
        query = f"?wait={wait:.3f}" if wait > 0 else ""
        data = self._call("GET", path + query, missing_ok=True)
        return None if data is None else self._job(data, path)

    def wait(self, job_id: str, on_update: Callable[[JobOut], None] | None = None,
             timeout: float | None = None) -> JobOut:
        """Ask for job ``job_id`` until it is no longer running and return it, done or error
        alike; each question is held by the agent for up to poll_interval (a long poll), so the
        end is seen at once, and an answer that comes back sooner while the job runs is followed
        by a pause for the rest of poll_interval. ``on_update`` sees every job answered, the last
        one too. Raises AgentError when the job vanishes (status 404), is still running after
        ``timeout`` seconds, or the agent cannot be reached."""
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            asked = self._clock()
            left = None if deadline is None else max(0.0, deadline - asked)
            job = self.job(job_id, wait=self._hold(left))
            if job is None:
                raise AgentError(host=self.host_name, status=404, agent_status=404,
                                 reason=f"job {job_id} is unknown to {self.base_url}: the agent restarted "
                                        f"and lost it; look at the instance's state on the host")
            if on_update is not None:
                on_update(job)
            if job.state != "running":
                return job
            now = self._clock()
            pause = self.poll_interval - (now - asked)
            if deadline is not None:
                if deadline - now <= 0:
                    raise AgentError(host=self.host_name, agent_status=None,
                                     reason=f"job {job_id} ({job.op}) still running after {timeout} s")
                pause = min(pause, deadline - now)
            if pause > 0:
                self._sleep(pause)

    def _hold(self, left: float | None) -> float:
        """How long the agent may hold one question: poll_interval, well inside the request
        timeout and the agent's bound (MAX_JOB_WAIT), and not past the caller's deadline."""
        hold = min(self.poll_interval, self.timeout / 2, MAX_JOB_WAIT)
        return hold if left is None else min(hold, left)

    def _get(self, model: type[M], path: str) -> M:
        return self._parse(model, self._call("GET", path), path)

    def _job(self, data: Any, path: str) -> JobOut:
        """A job with its result parsed as its op's result model (agent.schemas.RESULTS); the
        result is None unless the job is done and its op has one."""
        job = self._parse(JobOut, data, path)
        try:
            job.result = parse_result(job.op, job.result) if job.state == "done" else None
        except pydantic.ValidationError as e:
            raise self._misfit(f"a {job.op} result", path, e) from None
        return job

    def _parse(self, model: type[M], data: Any, path: str) -> M:
        """``data`` as ``model``; AgentError naming the URL when it does not fit."""
        try:
            return model.model_validate(data)
        except pydantic.ValidationError as e:
            raise self._misfit(f"a {model.__name__}", path, e) from None

    def _misfit(self, what: str, path: str, e: pydantic.ValidationError) -> AgentError:
        where = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'body'}: {err['msg']}" for err in e.errors())
        return AgentError(host=self.host_name, agent_status=None,
                          reason=f"{self.base_url}{path} answered with {what} that does not fit ({where}): "
                                 f"check that the agent runs the same coldferry version as the controller")

    def _check_power_state(self, inst: InstanceOut, path: str) -> InstanceOut:
        if inst.power_state not in _POWER_STATES:
            raise AgentError(host=self.host_name, agent_status=None,
                             reason=f"{self.base_url}{path} answered with power state {inst.power_state} of "
                                    f"instance {inst.uuid}, which is none of {sorted(map(int, PowerState))}")
        return inst

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              missing_ok: bool = False) -> Any:
        """Send one request, again while the agent cannot be reached (up to retry_seconds);
        return the JSON of a 2xx answer (None for a 404 when ``missing_ok``), raise
        AgentError for the rest (AgentUnreachable when it never answered)."""
        start = self._clock()

        def out_of_time(state: RetryCallState) -> bool:
            return self._clock() - start >= self.retry_seconds

        retrying = Retrying(retry=retry_if_exception_type(AgentUnreachable), stop=out_of_time,
                            wait=wait_exponential(multiplier=0.25, max=5.0), sleep=self._sleep, reraise=True)
        return retrying(self._send, method, path, body, missing_ok)

    def _send(self, method: str, path: str, body: dict[str, Any] | None, missing_ok: bool) -> Any:
        url = f"{self.base_url}{path}"
        try:
            response = self._http.request(method, path, json=body, headers=self._headers)
        except httpx.TimeoutException:
            raise AgentUnreachable(host=self.host_name, agent_status=None,
                                   reason=f"no answer from {url} within {self.timeout} s: check that the agent "
                                          f"runs and is not overloaded, or raise agent_timeout") from None
        except httpx.TransportError as e:
            reason = self._tls_reason(url, e)
            if reason is not None:
                raise AgentUnreachable(host=self.host_name, agent_status=None, reason=reason) from None
            raise AgentUnreachable(host=self.host_name, agent_status=None,
                                   reason=f"cannot reach {url}: {e or e.__class__.__name__}: check that the "
                                          f"agent runs and that agent_url of host {self.host_name} is right "
                                          f"(https:// for an agent with tls_cert)") from None
        code = response.status_code
        if code == 404 and missing_ok:
            return None
        if code < 300:
            try:
                return response.json()
            except ValueError:
                raise AgentError(host=self.host_name, agent_status=code,
                                 reason=f"{url} answered {code} without JSON: check that agent_url of "
                                        f"host {self.host_name} points at a coldferry agent") from None
        detail = _detail(response)
        if code in (401, 403):
            raise AgentError(host=self.host_name, agent_status=code,
                             reason=f"{url} refused the token ({code} {detail}): check agent_token "
                                    f"for host {self.host_name} in the controller's configuration")
        if code >= 500 or code < 400:
            raise AgentError(host=self.host_name, agent_status=code,
                             reason=f"{method} {url} failed with {code}: {detail}; see the agent's log "
                                    f"on host {self.host_name}")
        raise AgentError(host=self.host_name, status=code, agent_status=code, reason=detail)


    def _tls_reason(self, url: str, failure: httpx.TransportError) -> str | None:
        """Why TLS with the agent failed, and which settings to look at; None when TLS is not to blame."""
        error = _tls_error(failure)
        if error is None:
            if isinstance(failure, httpx.RemoteProtocolError) and url.startswith("https:") and not self.client_cert:
                # TLS 1.3: an agent with tls_client_ca hangs up on a client without a certificate after the handshake
                return (f"{url} closed the connection without an answer ({failure}): an agent with tls_client_ca "
                        f"does so to a client without a certificate: set agent_client_cert and agent_client_key "
                        f"in the controller's configuration, or see the agent's log on host {self.host_name}")
            return None
        if isinstance(error, ssl.SSLCertVerificationError):
            trust = f"the CA file {self.ca_file}" if self.ca_file else "the system's trust store"
            return (f"{url} showed a certificate that {trust} does not accept ({error.verify_message}): "
                    f"check agent_ca in the controller's configuration, and that the agent's tls_cert names "
                    f"the host of agent_url of host {self.host_name} (coldferry tls make-cert --dns/--ip)")
        return (f"TLS with {url} failed ({error.reason or error}): check that agent_url of host {self.host_name} "
                f"is https:// only when the agent has tls_cert, and, when the agent sets tls_client_ca, "
                f"agent_client_cert and agent_client_key in the controller's configuration")


@functools.cache
def tls_context(ca_file: str | None, client_cert: tuple[str, str] | None) -> ssl.SSLContext:
    """The TLS context of agent clients: agents' certificates checked against ``ca_file`` (None:
    the system's trust store), ``client_cert`` shown when asked. One per settings, shared by
    the clients of every host."""
    context = ssl.create_default_context(cafile=ca_file)
    if client_cert is not None:
        context.load_cert_chain(*client_cert)
    return context


def _tls_error(error: BaseException) -> ssl.SSLError | None:
    """The ssl error behind a transport error, if one is."""
    seen: BaseException | None = error
    while seen is not None and not isinstance(seen, ssl.SSLError):
        seen = seen.__cause__ or seen.__context__
    return seen


def _quote(segment: str) -> str:
    """One path segment: a '/' or '..' in an id must not change the path.
    Raises ValueError for an empty or dot-only id."""
    if segment in ("", ".", ".."):
        raise ValueError(f"{segment!r} is not an instance or job id")
    return urllib.parse.quote(segment, safe="")


def _detail(response: httpx.Response) -> str:
    """The agent's ``detail``, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    detail = body.get("detail") if isinstance(body, dict) else None
    if detail is None:
        return json.dumps(body)[:200]
    return detail if isinstance(detail, str) else json.dumps(detail)
