"""The controller's client of one host's agent (the agent API of docs/api.md)."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, cast

import httpx

from .errors import AgentError

# An operation is a path word of the agent API; nothing else may reach the URL.
_OP = re.compile(r"^[a-z][a-z-]*$")


class AgentClient:
    """Calls one agent over HTTP with its bearer token.

    ``http`` is an httpx.Client to send through (tests pass a FastAPI
    TestClient); without one the client opens its own on ``base_url`` with
    ``timeout`` seconds per request. ``sleep`` and ``clock`` pace wait().

    Every method raises AgentError: for transport problems, timeouts, a
    refused token and 5xx answers with a reason naming the URL and the fix;
    for other 4xx answers with the agent's ``detail`` as reason and the
    agent's code as ``status`` (so callers can map 404 and 409).
    ``agent_status`` holds the agent's code, None when it did not answer.
    """

    def __init__(self, host_name: str, base_url: str, token: str, http: httpx.Client | None = None,
                 timeout: float = 10.0, sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic, poll_interval: float = 1.0) -> None:
        self.host_name = host_name
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.poll_interval = poll_interval
        self._headers = {"Authorization": f"Bearer {token}"}
        self._own = http is None
        self._http = http if http is not None else httpx.Client(base_url=self.base_url, timeout=timeout)
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

    def host(self) -> dict[str, Any]:
        """The host's resources plus its data-plane ``address``."""
        return cast(dict[str, Any], self._call("GET", "/v1/host"))

    def instances(self) -> list[dict[str, Any]]:
        return cast(list[dict[str, Any]], self._call("GET", "/v1/instances")["instances"])

    def instance(self, uuid: str) -> dict[str, Any] | None:
        """The instance, or None when the agent does not know it."""
        return cast("dict[str, Any] | None", self._call("GET", f"/v1/instances/{_quote(uuid)}", missing_ok=True))

    def start(self, uuid: str, op: str, body: dict[str, Any]) -> dict[str, Any]:
        """Start job ``op`` (a path word such as ``migrate-disk-and-power-off``) on instance
        ``uuid`` and return the job as the agent accepted it. Raises ValueError for an op
        that is not a path word."""
        if not _OP.match(op):
            raise ValueError(f"agent operation {op!r} is not a path word such as power-on")
        return cast(dict[str, Any], self._call("POST", f"/v1/instances/{_quote(uuid)}/{op}", body=body))

    def job(self, job_id: str) -> dict[str, Any] | None:
        """The job, or None when the agent does not know it (e.g. it restarted)."""
        return cast("dict[str, Any] | None", self._call("GET", f"/v1/jobs/{_quote(job_id)}", missing_ok=True))

    def wait(self, job_id: str, on_update: Callable[[dict[str, Any]], None] | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        """Poll job ``job_id`` every poll_interval until it is no longer running and return it,
        done or error alike. ``on_update`` sees every polled job, the last one too.
        Raises AgentError when the job vanishes (status 404), is still running after
        ``timeout`` seconds, or the agent cannot be reached."""
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            job = self.job(job_id)
            if job is None:
                raise AgentError(host=self.host_name, status=404, agent_status=404,
                                 reason=f"job {job_id} is unknown to {self.base_url}: the agent restarted "
                                        f"and lost it; look at the instance's state on the host")
            if on_update is not None:
                on_update(job)
            if job.get("state") != "running":
                return job
            if deadline is not None:
                left = deadline - self._clock()
                if left <= 0:
                    raise AgentError(host=self.host_name, agent_status=None,
                                     reason=f"job {job_id} ({job.get('op')}) still running after {timeout} s")
                self._sleep(min(self.poll_interval, left))
            else:
                self._sleep(self.poll_interval)

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              missing_ok: bool = False) -> Any:
        """Send one request; return the JSON of a 2xx answer (None for a 404 when
        ``missing_ok``), raise AgentError for the rest."""
        url = f"{self.base_url}{path}"
        try:
            response = self._http.request(method, path, json=body, headers=self._headers)
        except httpx.TimeoutException:
            raise AgentError(host=self.host_name, agent_status=None,
                             reason=f"no answer from {url} within {self.timeout} s: check that the agent "
                                    f"runs and is not overloaded, or raise agent_timeout") from None
        except httpx.TransportError as e:
            raise AgentError(host=self.host_name, agent_status=None,
                             reason=f"cannot reach {url}: {e or e.__class__.__name__}: check that the agent "
                                    f"runs and that agent_url of host {self.host_name} is right") from None
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
