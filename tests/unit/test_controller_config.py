"""ControllerConfig: [controller] and [[hosts]] of a TOML file, checked."""

from __future__ import annotations

import pytest

from controller.config import ControllerConfig, ControllerConfigError, HostConfig
from controller.errors import ControllerError
from controller.records import HostRecord

HOSTS = """
[[hosts]]
name = "compute1"
agent_url = "http://192.0.2.11:8797/"
address = "192.0.2.11"
agent_token = "t1"

[[hosts]]
name = "compute2"
agent_url = "https://compute2.example:8797"
address = "198.18.0.12"
agent_token_file = "compute2.token"
"""


def write(tmp_path, text: str) -> str:
    p = tmp_path / "controller.toml"
    p.write_text(text)
    return str(p)


def load_error(tmp_path, text: str) -> str:
    with pytest.raises(ControllerConfigError) as e:
        ControllerConfig.load(write(tmp_path, text))
    return str(e.value)


def test_defaults_with_only_a_token(tmp_path):
    c = ControllerConfig.load(write(tmp_path, '[controller]\ntoken = "admin"\n'))
    assert (c.listen, c.port, c.database) == ("127.0.0.1", 8798, "sqlite:////var/lib/coldferry/controller.db")
    assert (c.cpu_allocation_ratio, c.ram_allocation_ratio, c.disk_allocation_ratio) == (16.0, 1.5, 1.0)
    assert (c.auto_confirm_seconds, c.agent_timeout, c.poll_interval) == (0, 10.0, 1.0)
    assert c.hosts == ()
    assert c.token == "admin"


def test_full_file_with_hosts_and_token_files(tmp_path):
    (tmp_path / "admin.token").write_text("s3cret\n")
    (tmp_path / "compute2.token").write_text("  t2  \n")
    c = ControllerConfig.load(write(tmp_path, """
[controller]
listen = "0.0.0.0"
port = 9000
token_file = "admin.token"
database = "postgresql+psycopg://coldferry@db.example/coldferry"
auto_confirm_seconds = 300
cpu_allocation_ratio = 4
ram_allocation_ratio = 1.0
agent_timeout = 2.5
poll_interval = 0.2
""" + HOSTS))
    assert (c.listen, c.port, c.token, c.auto_confirm_seconds) == ("0.0.0.0", 9000, "s3cret", 300)
    assert c.cpu_allocation_ratio == 4.0 and isinstance(c.cpu_allocation_ratio, float)
    assert (c.agent_timeout, c.poll_interval) == (2.5, 0.2)
    assert c.hosts == (HostConfig("compute1", "http://192.0.2.11:8797", "192.0.2.11", "t1"),
                       HostConfig("compute2", "https://compute2.example:8797", "198.18.0.12", "t2"))
    assert c.host("compute2").agent_token == "t2" and c.host("nope") is None
    assert c.hosts[0].record() == HostRecord("compute1", "http://192.0.2.11:8797", "192.0.2.11")


def test_tokens_stay_out_of_repr():
    c = ControllerConfig(token="admin-secret", hosts=(HostConfig("a", "http://a:1", "a", "host-secret"),))
    assert "admin-secret" not in repr(c) and "host-secret" not in repr(c)


def test_agent_tables_may_share_the_file(tmp_path):
    c = ControllerConfig.load(write(tmp_path, '[agent]\nport = 1\n[driver]\nx = 1\n[controller]\ntoken = "a"\n'))
    assert c.token == "a"


def test_unknown_controller_keys_are_listed(tmp_path):
    msg = load_error(tmp_path, '[controller]\ntoken = "a"\nprot = 1\nlisten_addr = "x"\n')
    assert msg.startswith("[controller] has unknown key(s) listen_addr, prot in ")
    assert "the known keys are agent_ca, agent_client_cert, agent_client_key, agent_lost_seconds," in msg
    assert "controller.toml" in msg


def test_unknown_table_is_rejected(tmp_path):
    msg = load_error(tmp_path, '[controller]\ntoken = "a"\n[[host]]\nname = "x"\n')
    assert "unknown table(s) host" in msg and "[[hosts]]" in msg


@pytest.mark.parametrize("extra, words", [
    ("", "[controller] has neither token nor token_file in "),
    ('token = "a"\ntoken_file = "f"\n', "[controller] has both token and token_file in "),
    ('token = " "\n', "bad [controller] token in "),
    ('token_file = "missing.token"\n', "[controller] token_file: cannot read "),
])
def test_admin_token_is_required_once(tmp_path, extra, words):
    msg = load_error(tmp_path, "[controller]\n" + extra)
    assert words in msg and "\n" not in msg


def test_empty_token_file_is_an_error(tmp_path):
    (tmp_path / "t").write_text("\n")
    msg = load_error(tmp_path, '[controller]\ntoken_file = "t"\n')
    assert f"token_file: {tmp_path}/t is empty in " in msg and msg.endswith(": write the token into it")


@pytest.mark.parametrize("line, words", [
    ('port = "8798"', "bad [controller] port = '8798' in "),
    ('port = "8798"', "expected an integer, a TCP port"),
    ("port = 70000", "a TCP port, 1 to 65535"),
    ("ram_allocation_ratio = 0", "a number above 0"),
    ("cpu_allocation_ratio = true", "bad [controller] cpu_allocation_ratio = True in "),
    ("cpu_allocation_ratio = true", "expected a number"),
    ("auto_confirm_seconds = -1", "0 to wait for the user"),
    ("poll_interval = 0", "seconds above 0 between polls"),
    ('database = "not a url"', "an SQLAlchemy URL such as sqlite:////"),
    ('listen = ""', "an address to listen on"),
])
def test_bad_values_name_the_key_and_the_fix(tmp_path, line, words):
    assert words in load_error(tmp_path, f'[controller]\ntoken = "a"\n{line}\n')


def test_constructor_checks_too():
    with pytest.raises(ControllerConfigError, match=r"bad \[controller\] agent_timeout = 0 in ControllerConfig\(\)"):
        ControllerConfig(token="a", agent_timeout=0)
    assert ControllerConfig(token="a", agent_timeout=3).agent_timeout == 3.0


HOST = '[controller]\ntoken = "a"\n[[hosts]]\n'


@pytest.mark.parametrize("entry, words", [
    ('agent_url = "http://a:8797"\naddress = "a"\nagent_token = "t"', "[[hosts]] entry 1 is missing name in "),
    ('name = "a"\naddress = "a"\nagent_token = "t"', "entry 1 ('a') is missing agent_url in "),
    ('name = "a"\naddress = "a"\nagent_token = "t"', ": where the host's agent answers"),
    ('name = "a"\nagent_url = "http://a:8797"\nagent_token = "t"', "is missing address in "),
    ('name = "a"\nagent_url = "http://a:8797"\nagent_token = "t"', ": the address other hosts"),
    ('name = "a"\nagent_url = "http://a:8797"\naddress = "a"', "has neither agent_token nor agent_token_file"),
    ('name = "a"\nagent_url = "http://a:8797"\naddress = "a"\nagent_token = "t"\nport = 1',
     "has unknown key(s) port in "),
    ('name = "a"\nagent_url = "http://a:8797"\naddress = "a"\nagent_token = "t"\nport = 1',
     "the known keys are address, agent_token, agent_token_file, agent_url, name"),
    ('name = "a"\nagent_url = "ftp://a"\naddress = "a"\nagent_token = "t"',
     "bad [[hosts]] entry 1 ('a') agent_url = 'ftp://a'"),
    ('name = "a"\nagent_url = "a:8797"\naddress = "a"\nagent_token = "t"', "agent_url = 'a:8797' in "),
    ('name = "a"\nagent_url = "http://a:99999"\naddress = "a"\nagent_token = "t"', "port must be a number"),
    ('name = "a b"\nagent_url = "http://a"\naddress = "a"\nagent_token = "t"', "name = 'a b' in "),
    ('name = "a b"\nagent_url = "http://a"\naddress = "a"\nagent_token = "t"', "letters, digits, '.', '_' and '-'"),
    ('name = "a"\nagent_url = "http://a"\naddress = "a b"\nagent_token = "t"', "address = 'a b' in "),
    ('name = "a"\nagent_url = "http://a"\naddress = "a:22"\nagent_token = "t"', "a host name or an IP address"),
    ('name = "a"\nagent_url = "http://a"\naddress = "root@a"\nagent_token = "t"', "address = 'root@a' in "),
    ('name = 3\nagent_url = "http://a"\naddress = "a"\nagent_token = "t"', "name = 3 in "),
    ('name = 3\nagent_url = "http://a"\naddress = "a"\nagent_token = "t"', "expected a string"),
])
def test_bad_host_entries(tmp_path, entry, words):
    assert words in load_error(tmp_path, HOST + entry + "\n")


def test_duplicate_host_names(tmp_path):
    entry = 'name = "a"\nagent_url = "http://a:8797"\naddress = "a"\nagent_token = "t"\n'
    msg = load_error(tmp_path, HOST + entry + "[[hosts]]\n" + entry)
    assert "[[hosts]] entry 2 ('a') has a duplicate host name 'a' in " in msg


def test_hosts_must_be_an_array_of_tables():
    with pytest.raises(ControllerConfigError, match="array of tables"):
        ControllerConfig.from_dict({"controller": {"token": "a"}, "hosts": {"name": "a"}}, source="x.toml")


def test_unreadable_or_broken_file(tmp_path):
    with pytest.raises(ControllerConfigError, match="cannot read the controller configuration in .*missing.toml"):
        ControllerConfig.load(str(tmp_path / "missing.toml"))
    msg = load_error(tmp_path, "[controller\n")
    assert "cannot read the controller configuration" in msg
    assert issubclass(ControllerConfigError, ControllerError)


@pytest.mark.parametrize("line", ["shutdown_timeout = 60", "shutdown_retry_interval = 10"])
def test_shutdown_settings_moved_to_the_agents(tmp_path, line):
    msg = load_error(tmp_path, f'[controller]\ntoken = "a"\n{line}\n')
    key = line.split()[0]
    assert msg.startswith(f"[controller] sets {key} in {tmp_path}/controller.toml: ")
    assert "moved to the [driver] table of each host's agent configuration" in msg and "\n" not in msg


def test_a_relative_token_file_is_read_next_to_the_config_file(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "admin.token").write_text("beside\n")
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "conf" / "controller.toml"
    path.write_text('[controller]\ntoken_file = "admin.token"\n')
    assert ControllerConfig.load(str(path)).token == "beside"


def test_recovery_settings_have_safe_defaults_and_are_checked(tmp_path):
    c = ControllerConfig.load(write(tmp_path, '[controller]\ntoken = "a"\n'))
    assert (c.agent_retry_seconds, c.agent_lost_seconds, c.recovery_interval) == (15.0, 300.0, 30.0)
    c = ControllerConfig.load(write(tmp_path, '[controller]\ntoken = "a"\nagent_retry_seconds = 0\n'
                                              'agent_lost_seconds = 60\nrecovery_interval = 5\n'))
    assert (c.agent_retry_seconds, c.agent_lost_seconds, c.recovery_interval) == (0, 60, 5)
    for bad in ("agent_lost_seconds = 0", "agent_retry_seconds = -1", "recovery_interval = 0"):
        msg = load_error(tmp_path, f'[controller]\ntoken = "a"\n{bad}\n')
        assert bad.split()[0] in msg


def test_controller_command_help_shows_the_tls_settings(capsys):
    from coldferry.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["controller", "--help"])
    out = capsys.readouterr().out
    for word in ("tls_cert", "tls_key", "agent_ca", "agent_client_cert", "plain_http", 'agent_url = "https://',
                 "coldferry tls --help"):
        assert word in out
