"""AgentConfig: the [agent] table of a TOML file, with DriverConfig's [driver] table."""

from __future__ import annotations

import os

import pytest

from agent.config import AgentConfig, ConfigError
from coldferry.agent_cmd import build_driver
from coldferry.cli import build_parser
from driver.memory import MemoryDriver


def write(tmp_path, text: str, name: str = "agent.toml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_with_an_inline_token(tmp_path):
    c = AgentConfig.load(write(tmp_path, '[agent]\ntoken = "abc"\n'))
    assert (c.listen, c.port, c.token, c.driver) == ("0.0.0.0", 8797, "abc", "libvirt")
    assert c.address == os.uname().nodename
    assert c.driver_config.instances_path == "/var/lib/coldferry/instances"
    assert "abc" not in repr(c)  # the token stays out of logs


def test_every_setting_and_the_driver_table(tmp_path):
    token = write(tmp_path, "  tok-from-file\n", "agent.token")
    c = AgentConfig.load(write(tmp_path, f"""
[agent]
listen = "198.18.0.11"
port = 9000
token_file = "{token}"
address = "198.18.0.11"
driver = "memory"

[driver]
host_name = "h1"
transfer_method = "rsync"
"""))
    assert (c.listen, c.port, c.token, c.address, c.driver) == ("198.18.0.11", 9000, "tok-from-file",
                                                                "198.18.0.11", "memory")
    assert (c.driver_config.host_name, c.driver_config.transfer_method) == ("h1", "rsync")


def test_a_token_is_required(tmp_path):
    with pytest.raises(ConfigError, match='set token = "..." or token_file'):
        AgentConfig.load(write(tmp_path, "[agent]\nport = 8797\n"))


def test_token_and_token_file_together_are_an_error(tmp_path):
    with pytest.raises(ConfigError, match="either token or token_file"):
        AgentConfig.load(write(tmp_path, '[agent]\ntoken = "a"\ntoken_file = "/x"\n'))


def test_unreadable_or_empty_token_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read token_file /nonexistent/token"):
        AgentConfig.load(write(tmp_path, '[agent]\ntoken_file = "/nonexistent/token"\n'))
    empty = write(tmp_path, "\n", "empty.token")
    with pytest.raises(ConfigError, match="is empty"):
        AgentConfig.load(write(tmp_path, f'[agent]\ntoken_file = "{empty}"\n'))


def test_unknown_agent_keys_list_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown agent settings in .*: bind, prot \(known: address, driver, "
                                          r"listen, port, token, token_file\)"):
        AgentConfig.load(write(tmp_path, '[agent]\ntoken = "a"\nbind = "x"\nprot = 1\n'))


def test_unknown_driver_keys_come_from_driver_config(tmp_path):
    with pytest.raises(ConfigError, match="unknown driver settings .*: libvirt_url"):
        AgentConfig.load(write(tmp_path, '[agent]\ntoken = "a"\n[driver]\nlibvirt_url = "x"\n'))


@pytest.mark.parametrize("line,match", [
    ('port = "8797"', "bad agent setting port = '8797'"),
    ("port = 70000", "bad agent setting port = 70000"),
    ("port = true", "bad agent setting port = True"),
    ('driver = "xen"', "expected one of: libvirt, memory"),
    ('listen = ""', "bad agent setting listen"),
])
def test_bad_values_name_the_setting(tmp_path, line, match):
    with pytest.raises(ConfigError, match=match):
        AgentConfig.load(write(tmp_path, f'[agent]\ntoken = "a"\n{line}\n'))


def test_unreadable_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read agent configuration /nonexistent.toml"):
        AgentConfig.load("/nonexistent.toml")
    with pytest.raises(ConfigError, match="cannot read agent configuration"):
        AgentConfig.load(write(tmp_path, "[agent\n"))


def test_memory_driver_is_built_from_the_config(tmp_path):
    c = AgentConfig.load(write(tmp_path, '[agent]\ntoken = "a"\ndriver = "memory"\naddress = "10.0.0.5"\n'
                                         '[driver]\nhost_name = "demo"\n'))
    drv = build_driver(c)
    assert isinstance(drv, MemoryDriver)
    assert (drv.host_name, drv.address, drv.host_resources().hostname) == ("demo", "10.0.0.5", "demo")


def test_agent_command_help_explains_the_config(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["agent", "--help"])
    out = capsys.readouterr().out
    for word in ("--config FILE", "token_file", "address", '[agent]', "8797", 'driver       "libvirt"'):
        assert word in out


def test_agent_command_refuses_a_bad_config(tmp_path, capsys):
    args = build_parser().parse_args(["agent", "--config", write(tmp_path, "[agent]\n")])
    assert args.func(args) == 2
    assert "the agent needs a token" in capsys.readouterr().err
