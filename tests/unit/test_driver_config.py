"""DriverConfig: the [driver] table of a TOML file, checked."""

from __future__ import annotations

import os

import pytest

from driver.errors import DriverError
from driver.libvirt import DriverConfig
from driver.settings import SettingsError
from transfer.options import CopyOptions


def write(tmp_path, text: str) -> str:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return str(p)


def test_defaults():
    c = DriverConfig()
    assert (c.libvirt_uri, c.instances_path, c.transfer_method, c.backing) == (
        "qemu:///system", "/var/lib/coldferry/instances", "stream", "send")
    assert c.host_name == os.uname().nodename


def test_load_reads_the_driver_table(tmp_path):
    path = write(tmp_path, """
[agent]
listen = "0.0.0.0:8774"

[driver]
libvirt_uri = "qemu+unix:///system?socket=/run/lab/h1/libvirt-sock"
instances_path = "/srv/lab/h1/instances"
host_name = "h1"
transfer_method = "rsync"
transfer_streams = 4
backing = "flatten"
remote_command = ["/opt/venv/bin/coldferry", "receive"]
create_bridges = true
start_timeout = 12.5
""")
    c = DriverConfig.load(path)
    assert c.libvirt_uri == "qemu+unix:///system?socket=/run/lab/h1/libvirt-sock"
    assert (c.instances_path, c.host_name, c.transfer_method, c.transfer_streams, c.backing) == (
        "/srv/lab/h1/instances", "h1", "rsync", 4, "flatten")
    assert c.remote_command == ("/opt/venv/bin/coldferry", "receive")
    assert c.create_bridges is True and c.start_timeout == 12.5
    hash(c)  # frozen and hashable: remote_command became a tuple


def test_load_without_a_driver_table_gives_defaults(tmp_path):
    assert DriverConfig.load(write(tmp_path, "[agent]\nx = 1\n")).transfer_method == "stream"


def test_unknown_keys_are_rejected_with_the_list(tmp_path):
    path = write(tmp_path, '[driver]\ninstance_path = "/x"\ntransfer_mehtod = "rsync"\n')
    with pytest.raises(DriverError) as e:
        DriverConfig.load(path)
    msg = str(e.value)
    assert msg.startswith(f"[driver] has unknown key(s) instance_path, transfer_mehtod in {path}: ")
    assert "instances_path" in msg and "transfer_method" in msg  # the known names, to fix the typo


@pytest.mark.parametrize("line, name", [
    ('transfer_method = "scp"', "transfer_method"),
    ('transfer_channel = "udp"', "transfer_channel"),
    ('backing = "copy"', "backing"),
    ('instances_path = "relative/dir"', "instances_path"),
    ("transfer_streams = 99", "transfer_streams"),
    ('transfer_compress = "fastest"', "transfer_compress"),
    ("transfer_bwlimit = -1", "transfer_bwlimit"),
    ("shutdown_timeout = 0", "shutdown_timeout"),
])
def test_bad_values_are_rejected(tmp_path, line, name):
    with pytest.raises(DriverError) as e:
        DriverConfig.load(write(tmp_path, f"[driver]\n{line}\n"))
    assert str(e.value).startswith(f"bad [driver] {name} = ")


def test_missing_file_is_a_driver_error(tmp_path):
    with pytest.raises(DriverError) as e:
        DriverConfig.load(str(tmp_path / "nope.toml"))
    assert "cannot read the driver configuration in " in str(e.value) and "nope.toml" in str(e.value)


def test_bad_toml_is_a_driver_error(tmp_path):
    with pytest.raises(DriverError) as e:
        DriverConfig.load(write(tmp_path, "[driver\nx = \n"))
    assert "cannot read the driver configuration" in str(e.value)


def test_from_dict_default_source_name():
    with pytest.raises(DriverError) as e:
        DriverConfig.from_dict({"bogus": 1})
    assert str(e.value).startswith("[driver] has unknown key(s) bogus in configuration: ")


@pytest.mark.parametrize("line", ['transfer_streams = "four"', 'create_bridges = "false"', 'start_timeout = "60"'])
def test_values_of_the_wrong_type_are_rejected(tmp_path, line):
    with pytest.raises(DriverError, match=r"^bad \[driver\] \w+ = .* in .*: expected "):
        DriverConfig.load(write(tmp_path, f"[driver]\n{line}\n"))


def test_the_transfer_settings_are_checked_as_copy_options(tmp_path):
    path = write(tmp_path, '[driver]\ntransfer_streams = 99\n')
    with pytest.raises(SettingsError) as e:
        DriverConfig.load(path)
    assert str(e.value) == f"bad [driver] transfer_streams = 99 in {path}: use 1 to 16"
    c = DriverConfig.load(write(tmp_path, '[driver]\ntransfer_method = "rsync"\ntransfer_bwlimit = 2048\n'
                                          'transfer_fsync = false\n'))
    assert c.copy_options == CopyOptions(method="rsync", bwlimit=2048, fsync=False)
    assert DriverConfig().copy_options.fsync is True  # the driver's default, not CopyOptions'


def test_rsync_bandwidth_below_a_kib_is_refused_at_load(tmp_path):
    with pytest.raises(SettingsError, match=r"bad \[driver\] transfer_bwlimit = 100 in .*: rsync limits in KiB/s"):
        DriverConfig.load(write(tmp_path, '[driver]\ntransfer_method = "rsync"\ntransfer_bwlimit = 100\n'))


def test_the_shutdown_settings_are_the_drivers(tmp_path):
    c = DriverConfig.load(write(tmp_path, "[driver]\nshutdown_timeout = 45\nshutdown_retry_interval = 5\n"))
    assert (c.shutdown_timeout, c.shutdown_retry_interval) == (45, 5)
    assert (DriverConfig().shutdown_timeout, DriverConfig().shutdown_retry_interval) == (60, 10)
