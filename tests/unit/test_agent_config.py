"""AgentConfig: the [agent] table of a TOML file, with DriverConfig's [driver] table."""

from __future__ import annotations

import os
import subprocess
import sys

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


@pytest.mark.parametrize("text, match", [
    ("[agent]\nport = 8797\n",
     r'^\[agent\] has neither token nor token_file in .*: set exactly one: token = "..." or token_file = "/path"'),
    ('[agent]\ntoken = "a"\ntoken_file = "/x"\n', r"^\[agent\] has both token and token_file in "),
    ('[agent]\ntoken_file = "/nonexistent/token"\n', r"^\[agent\] token_file: cannot read /nonexistent/token in "),
    ('[agent]\ntoken = "a"\nbind = "x"\nprot = 1\n', r"^\[agent\] has unknown key\(s\) bind, prot in .*: the known "
                                                     r"keys are address, driver, listen, plain_http, port, tls_cert, "
                                                     r"tls_client_ca, tls_key, token, token_file$"),
    ('[agent]\ntoken = "a"\n[driver]\nlibvirt_url = "x"\n', r"^\[driver\] has unknown key\(s\) libvirt_url in "),
])
def test_token_and_key_mistakes_are_refused(tmp_path, text, match):
    with pytest.raises(ConfigError, match=match):
        AgentConfig.load(write(tmp_path, text))


def test_an_empty_token_file_is_refused(tmp_path):
    empty = write(tmp_path, "\n", "empty.token")
    with pytest.raises(ConfigError, match=r"token_file: .*empty.token is empty in .*: write the token into it$"):
        AgentConfig.load(write(tmp_path, f'[agent]\ntoken_file = "{empty}"\n'))


@pytest.mark.parametrize("line,match", [
    ('port = "8797"', r"bad \[agent\] port = '8797' in .*: expected an integer, a TCP port"),
    ("port = 70000", r"bad \[agent\] port = 70000 in .*: a TCP port, 1-65535"),
    ("port = true", r"bad \[agent\] port = True in "),
    ('driver = "xen"', r"bad \[agent\] driver = 'xen' in .*: one of: libvirt, memory"),
    ('listen = ""', r"bad \[agent\] listen = '' in "),
])
def test_bad_values_name_the_setting(tmp_path, line, match):
    with pytest.raises(ConfigError, match=match):
        AgentConfig.load(write(tmp_path, f'[agent]\ntoken = "a"\n{line}\n'))


def test_unreadable_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the agent configuration in /nonexistent.toml: "):
        AgentConfig.load("/nonexistent.toml")
    with pytest.raises(ConfigError, match="cannot read the agent configuration"):
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
    for word in ("--config FILE", "token_file", "address", '[agent]', "8797", 'driver       "libvirt"', "tls_cert",
                 "tls_key", "tls_client_ca", "plain_http", "coldferry tls --help"):
        assert word in out


def test_agent_command_refuses_a_bad_config(tmp_path, capsys):
    args = build_parser().parse_args(["agent", "--config", write(tmp_path, "[agent]\n")])
    assert args.func(args) == 2
    assert "[agent] has neither token nor token_file" in capsys.readouterr().err


def test_a_relative_token_file_is_read_next_to_the_config_file(tmp_path, monkeypatch):
    conf = tmp_path / "etc"
    conf.mkdir()
    write(conf, "beside\n", "agent.token")
    monkeypatch.chdir(tmp_path)
    assert AgentConfig.load(write(conf, '[agent]\ntoken_file = "agent.token"\n')).token == "beside"


def test_the_transfer_settings_become_copy_options(tmp_path):
    c = AgentConfig.load(write(tmp_path, '[agent]\ntoken = "a"\n[driver]\ntransfer_streams = 4\n'
                                         'transfer_compress = "fast"\ntransfer_channel = "tls"\n'))
    o = c.driver_config.copy_options
    assert (o.method, o.streams, o.channel, o.compress, o.fsync) == ("stream", 4, "tls", "fast", True)


@pytest.mark.parametrize("line, key", [("transfer_streams = 99", "transfer_streams"),
                                       ('transfer_compress = "fastest"', "transfer_compress"),
                                       ('transfer_method = "scp"', "transfer_method")])
def test_the_agent_refuses_to_start_with_bad_transfer_settings(tmp_path, line, key):
    """The real entry point, as systemd runs it: one line on stderr, no traceback, a failing exit."""
    path = write(tmp_path, f'[agent]\ntoken = "a"\ndriver = "memory"\nport = 1\n[driver]\n{line}\n')
    run = subprocess.run([sys.executable, "-m", "coldferry.cli", "agent", "--config", path],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert lines[0].startswith(f"coldferry agent: bad [driver] {key} = ") and f" in {path}: " in lines[0]
