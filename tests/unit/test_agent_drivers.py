"""The agent's driver selection (agent/drivers.py): libvirt, memory or the stubbed xenserver."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from agent import AgentConfig, ConfigError, JobRunner, create_app
from agent.drivers import build_driver
from driver.libvirt import LibvirtDriver
from driver.xenserver import StreamCopier, StubSession, XenServerDriver

UUID = "3c7e4b1a-0000-4000-8000-000000000042"


def load(tmp_path, text: str) -> AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text('[agent]\ntoken = "tok"\naddress = "198.18.0.11"\n' + text)
    return AgentConfig.load(str(path))


XEN = '''driver = "xenserver"
[driver]
host_name = "xen1"
ssh_user = "ferry"
ssh_port = 2222
ssh_identity = "/keys/id"
ssh_known_hosts = "/keys/known_hosts"
transfer_streams = 3
[xenserver]
sr_path = "{sr}"
coalesce_timeout = 5
'''


def xen_config(tmp_path) -> AgentConfig:
    return load(tmp_path, XEN.format(sr=tmp_path / "sr"))


def test_xenserver_driver_is_built_over_a_stub_session_with_the_driver_tables_ssh_settings(tmp_path):
    sr = tmp_path / "sr"
    drv = build_driver(load(tmp_path, XEN.format(sr=sr)))
    assert isinstance(drv, XenServerDriver) and isinstance(drv.session, StubSession)
    assert (drv.session.sr_path, drv.host_name, drv.coalesce_timeout) == (str(sr), "xen1", 5)
    assert sr.is_dir()
    copier = drv.copier
    assert isinstance(copier, StreamCopier)
    ep = copier.endpoint("198.18.0.12", "a.vhd")
    assert (ep.host, ep.path, ep.user, ep.port, ep.identity, ep.known_hosts) == (
        "198.18.0.12", f"{sr}/a.vhd", "ferry", 2222, "/keys/id", "/keys/known_hosts")
    assert copier.options == xen_config(tmp_path).driver_config.copy_options and copier.options.streams == 3


def test_the_agent_serves_the_xenserver_driver(tmp_path):
    sr = tmp_path / "sr"
    config = load(tmp_path, XEN.format(sr=sr))
    drv = build_driver(config)
    drv.session.add_vm(UUID, "xvm", 1 << 30)
    client = TestClient(create_app(drv, config.token, config.address, JobRunner()),
                        headers={"Authorization": "Bearer tok"})
    host = client.get("/v1/host").json()
    assert (host["hypervisor_type"], host["hostname"], host["extra"]) == ("xen", "xen1", {"session": "StubSession"})
    [inst] = client.get("/v1/instances").json()["instances"]
    assert (inst["uuid"], inst["name"], inst["flavor"]["root_gb"]) == (UUID, "xvm", 1)
    # The record file is the stub's: a second agent on the same SR finds the same host.
    assert [i.uuid for i in build_driver(config).list_instances()] == [UUID]


def test_xenserver_needs_an_sr_path(tmp_path):
    with pytest.raises(ConfigError, match=r'^\[agent\] driver = "xenserver" but \[xenserver\] has no sr_path '
                                          r'in .*agent.toml: the SR '):
        load(tmp_path, 'driver = "xenserver"\n')


@pytest.mark.parametrize("table,match", [
    ('sr_path = "relative/sr"', r"bad \[xenserver\] sr_path = 'relative/sr' in .*: an absolute directory path"),
    ('sr_path = "/sr"\ncoalesce_timeout = 0', r"bad \[xenserver\] coalesce_timeout = 0 in "),
    ('sr_path = "/sr"\ncoalesce_timeout = true', r"bad \[xenserver\] coalesce_timeout = True in "),
    ('sr_path = "/sr"\nstate_path = "rel"', r"bad \[xenserver\] state_path = 'rel' in .*: an absolute file path"),
    ('sr_path = "/sr"\npool = "p"', r"\[xenserver\] has unknown key\(s\) pool in .*: the known keys are "
                                     r"coalesce_timeout, sr_path, state_path$"),
])
def test_bad_xenserver_settings_name_the_setting(tmp_path, table, match):
    with pytest.raises(ConfigError, match=match):
        load(tmp_path, f'driver = "xenserver"\n[xenserver]\n{table}\n')


def test_libvirt_is_the_default_and_ignores_an_absent_xenserver_table(tmp_path):
    config = load(tmp_path, '[driver]\nhost_name = "kvm1"\n')
    drv = build_driver(config)
    assert isinstance(drv, LibvirtDriver) and drv.config.host_name == "kvm1"
    assert config.xenserver.sr_path == ""
