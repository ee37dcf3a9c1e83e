"""Both HTTP APIs fuzzed from their own OpenAPI documents by schemathesis, in process.

Each operation of the agent's and the controller's app gets requests
generated from its schema (valid ones and, as schemathesis does, some that
break it), sent through the ASGI transport with the app's bearer token. Every
answer must be no server error (5xx) and must be what the document says: a
documented status, its content type and a body that fits its schema.

The apps run over in-memory hosts (MemoryDrivers behind real agent apps, as
controller_env makes them). Generation is derandomized, so a run is the same
run every time; EXAMPLES bounds it to well under a minute.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tempfile

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)

from agent import JobRunner, create_app
from driver.memory import MemoryCloud, MemoryDriver
from driver.model import Flavor, PowerState
from tests.unit.controller_env import TOKEN as CONTROLLER_TOKEN
from tests.unit.controller_env import Env

AGENT_TOKEN = "fuzz-agent-token"
EXAMPLES = 150
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
SERVERS = [("00000000-0000-4000-8000-0000000000f1", "web", PowerState.RUNNING),
           ("00000000-0000-4000-8000-0000000000f2", "db", PowerState.SHUTDOWN)]

#: Answers seen per app and status class, printed at the end of the module (pytest -s shows them).
SEEN: Counter[tuple[str, str]] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _summary() -> Iterator[None]:
    yield
    _TMP.cleanup()
    for (app, what), n in sorted(SEEN.items()):
        print(f"fuzz {app}: {n} {what}")


def _agent_app() -> Any:
    cloud = MemoryCloud()
    driver = MemoryDriver("h1", cloud, "198.18.0.11")
    MemoryDriver("h2", cloud, "198.18.0.12")
    for uuid, name, state in SERVERS:
        driver.add_instance(uuid, name, Flavor("small", 1, 512, 1), state)
    return create_app(driver, AGENT_TOKEN, driver.address, JobRunner())


def _controller_app(tmp: Path) -> Any:
    env = Env.make(tmp, n=2)
    for uuid, name, state in SERVERS:
        env.add("host1", uuid, name, state)
    assert env.ctl is not None
    return env.ctl.app


# Built when the module is collected: schemathesis makes one test per operation from the loaded
# document, and its lazy loader (from_fixture) does not run under this pytest.
_TMP = tempfile.TemporaryDirectory(prefix="coldferry-fuzz-")
agent_api = schemathesis.openapi.from_asgi("/openapi.json", _agent_app())
controller_api = schemathesis.openapi.from_asgi("/openapi.json", _controller_app(Path(_TMP.name)))


def call(app: str, case: Any, token: str) -> None:
    SEEN[(app, "examples")] += 1
    response = case.call(headers={"Authorization": f"Bearer {token}"})
    SEEN[(app, f"answers {response.status_code // 100}xx")] += 1
    try:
        case.validate_response(response, checks=CHECKS, headers={"Authorization": f"Bearer {token}"})
    except Exception:
        SEEN[(app, "failures")] += 1
        raise


@agent_api.parametrize()
@FUZZ
def test_agent_api(case: Any) -> None:
    call("agent", case, AGENT_TOKEN)


@controller_api.parametrize()
@FUZZ
def test_controller_api(case: Any) -> None:
    call("controller", case, CONTROLLER_TOKEN)
