"""The libvirt driver lets only DriverErrors out, and the agent answers them 503 (never 500).

libvirt fails through ``fakes.FakeConn``/``FakeDomain`` (real libvirtErrors
with codes); the agent is the real app in front of the driver.
"""

from __future__ import annotations

import os
import shutil
import time

import libvirt
import pytest
from fastapi.testclient import TestClient

from agent import JobRunner, create_app
from driver.errors import HostError, InstanceNotFound, InstancesPathMissing, StartFailed
from driver.libvirt import driver as driver_mod


from .fakes import FakeDomain, libvirt_error
from .fakes import domain_xml as make_xml
from .test_libvirt_driver import UUID, Env, env, make_env  # noqa: F401 (fixtures)

TOKEN = "t0ken"
OTHER = "0b1f3f7c-0000-4d43-9a6e-6f1c3f9e8a44"
DOWN = libvirt_error("Cannot recv data: Connection reset by peer", libvirt.VIR_ERR_SYSTEM_ERROR)


def agent(env: Env) -> TestClient:
    return TestClient(create_app(env.driver, TOKEN, "198.18.0.1", JobRunner()),
                      headers={"Authorization": f"Bearer {TOKEN}"})


def vanished(env: Env, uuid: str = OTHER) -> FakeDomain:
    """A domain listAllDomains still returns but that was undefined before it could be read."""
    dom = env.conn.add(FakeDomain(uuid, "gone", make_xml(uuid, str(env.src / uuid)), clock=env.clock))
    dom.vanish()
    env.conn.listed.append(dom)
    return dom


def test_a_domain_that_vanishes_while_listing_is_left_out(env):
    env.add_instance()
    vanished(env)
    assert [i.uuid for i in env.driver.list_instances()] == [UUID]
    assert env.driver.host_resources().instances == 1
    r = agent(env).get("/v1/instances")
    assert r.status_code == 200 and [i["uuid"] for i in r.json()["instances"]] == [UUID]


def test_a_domain_that_vanishes_while_read_is_not_found(env):
    _, dom = env.add_instance()
    dom.fail["XMLDesc"] = libvirt_error("Domain not found", libvirt.VIR_ERR_NO_DOMAIN)
    with pytest.raises(InstanceNotFound):
        env.driver.get_instance(UUID)
    assert agent(env).get(f"/v1/instances/{UUID}").status_code == 404


def test_a_failing_domain_while_listing_is_a_host_error(env):
    _, dom = env.add_instance()
    dom.fail["XMLDesc"] = DOWN
    with pytest.raises(HostError, match="could not list the instances on host hostA: libvirt: Cannot recv data"):
        env.driver.list_instances()


@pytest.mark.parametrize("method", ["listAllDomains", "getInfo", "getCapabilities", "getVersion"])
def test_libvirt_failures_of_the_host_reads_are_503_with_the_message(env, method):
    env.conn.fail[method] = DOWN
    path = "/v1/instances" if method == "listAllDomains" else "/v1/host"
    r = agent(env).get(path)
    assert r.status_code == 503
    assert r.json()["detail"].endswith("on host hostA: libvirt: Cannot recv data: Connection reset by peer")


def test_a_missing_instances_path_is_named_with_its_setting(env):
    shutil.rmtree(env.src)
    with pytest.raises(InstancesPathMissing):
        env.driver.host_resources()
    r = agent(env).get("/v1/host")
    assert r.status_code == 503
    assert r.json()["detail"] == (f"the instances directory {env.src} does not exist on host hostA; create it, or "
                                  "correct instances_path in the [driver] section of the agent's configuration")


def test_a_libvirt_failure_reading_the_power_state_is_a_host_error(env):
    inst, dom = env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    dom.fail["state"] = DOWN
    with pytest.raises(HostError, match="could not power on the instance on host hostA: libvirt: Cannot recv"):
        env.driver.power_on(inst)


def test_a_start_failure_keeps_its_own_error(env):
    inst, dom = env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    dom.fail["create"] = libvirt_error("internal error: qemu unexpectedly closed the monitor")
    with pytest.raises(StartFailed, match="qemu unexpectedly closed the monitor"):
        env.driver.power_on(inst)


def test_an_os_error_in_a_job_ends_it_with_a_host_error(env, mocker):
    env.add_instance(state=libvirt.VIR_DOMAIN_SHUTOFF)
    os.rename(env.inst_dir, env.resize_dir)
    mocker.patch.object(driver_mod.os, "rename", side_effect=PermissionError(13, "Permission denied"))
    client = agent(env)
    job = client.post(f"/v1/instances/{UUID}/finish-revert-migration", json={"job_id": "r1"}).json()
    deadline = time.monotonic() + 5
    while job["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.01)
        job = client.get("/v1/jobs/r1").json()
    assert job["state"] == "error" and job["error"] == {
        "kind": "HostError", "message": "could not revert the migration on host hostA: [Errno 13] Permission denied"}
