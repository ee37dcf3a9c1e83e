"""/v2.1's front door: the version document, the token, microversions and Nova-shaped errors."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from controller.nova.versions import MAX, Version
from tests.unit import test_controller_api as base
from tests.unit.controller_env import TOKEN, Env
from tests.unit.test_controller_api import VM

env = base.env


def client(env: Env, **headers: str) -> TestClient:
    assert env.ctl is not None
    return TestClient(env.ctl.app, headers=headers)


@pytest.mark.parametrize("path", ["/v2.1", "/v2.1/"])
def test_the_version_document_needs_no_token(env: Env, path: str) -> None:
    r = client(env).get(path)
    assert r.status_code == 200, r.text
    doc = r.json()["version"]
    assert (doc["id"], doc["status"], doc["min_version"], doc["version"]) == ("v2.1", "CURRENT", "2.1", str(MAX))
    assert {"rel": "self", "href": "http://testserver/v2.1/"} in doc["links"]
    assert Version.parse(doc["version"]) < Version(2, 88)   # hypervisors keep their figures


@pytest.mark.parametrize("headers", [{}, {"X-Auth-Token": "nope"}, {"Authorization": "Bearer nope"}])
def test_a_missing_or_wrong_token_is_401_in_nova_shape(env: Env, headers: dict[str, str]) -> None:
    r = client(env, **headers).post("/v2.1/servers/x/action", content=b"{not json")
    assert r.status_code == 401 and "X-Auth-Token" in r.json()["unauthorized"]["message"]
    assert r.json()["unauthorized"]["code"] == 401


@pytest.mark.parametrize("headers", [{"X-Auth-Token": TOKEN}, {"Authorization": f"Bearer {TOKEN}"}])
def test_the_controllers_token_is_accepted_either_way(env: Env, headers: dict[str, str]) -> None:
    assert client(env, **headers).get("/v2.1/os-services").status_code == 200


@pytest.mark.parametrize("sent, answered", [
    ({}, "2.1"),
    ({"OpenStack-API-Version": "compute 2.56"}, "2.56"),
    ({"OpenStack-API-Version": "compute latest"}, str(MAX)),
    ({"X-OpenStack-Nova-API-Version": "2.53"}, "2.53"),
    ({"OpenStack-API-Version": "compute 2.60", "X-OpenStack-Nova-API-Version": "2.53"}, "2.60"),
])
def test_the_microversion_is_echoed(env: Env, sent: dict[str, str], answered: str) -> None:
    r = client(env, **{"X-Auth-Token": TOKEN, **sent}).get("/v2.1/os-services")
    assert r.status_code == 200
    assert r.headers["OpenStack-API-Version"] == f"compute {answered}"
    assert r.headers["X-OpenStack-Nova-API-Version"] == answered


@pytest.mark.parametrize("version, status, fault", [
    ("2.88", 406, "notAcceptable"), ("3.0", 406, "notAcceptable"), ("2.0", 406, "notAcceptable"),
    ("two", 400, "badRequest"), ("2.05", 400, "badRequest"),
])
def test_a_version_outside_the_range_or_malformed_is_refused(env: Env, version: str, status: int,
                                                              fault: str) -> None:
    r = client(env, **{"X-Auth-Token": TOKEN, "OpenStack-API-Version": f"compute {version}"}).get("/v2.1/os-services")
    assert r.status_code == status and r.json()[fault]["code"] == status, r.text


def test_errors_have_nova_shape(env: Env) -> None:
    c = client(env, **{"X-Auth-Token": TOKEN})
    r = c.get("/v2.1/no-such-thing")
    assert r.status_code == 404 and r.json() == {"itemNotFound": {"message": "The resource could not be found.",
                                                                  "code": 404}}
    r = c.post(f"/v2.1/servers/{VM}/action", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["badRequest"]["message"]
    assert c.delete("/v2.1/os-services").status_code == 405
    # /v1 keeps its own shape beside it.
    assert client(env).get("/v1/servers").json()["detail"].startswith("missing or wrong token")
