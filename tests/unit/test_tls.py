"""TLS between the CLI, the controller and the agents: real servers, real certificates.

A CA and certificates are made with ``coldferry tls``'s functions; the agent
app (over a MemoryDriver) and the controller app run under uvicorn on
127.0.0.1 with the settings' TLS options, in a thread each.
"""

from __future__ import annotations

import logging
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from fastapi import FastAPI

from agent import JobRunner, create_app
from agent.config import AgentConfig, ConfigError, ServerTLS
from coldferry import cli
from coldferry.client import CA_ENV, CONFIG_ENV, TOKEN_ENV, URL_ENV, ClientError, ControllerClient
from coldferry.tls_cmd import TLSCommandError, make_ca, make_cert
from controller.agents import AgentClient
from controller.config import ControllerConfig, ControllerConfigError, HostConfig
from controller.errors import AgentError
from controller.service import build
from driver.memory import MemoryCloud, MemoryDriver
from driver.settings import SettingsError
from tests.support.serve import serve

AGENT_TOKEN = "agent-token"
TOKEN = "admin-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with a server certificate for 127.0.0.1 (``server``), a client certificate
    (``client``), and a second, unrelated CA (``other/ca.pem``)."""
    d = tmp_path_factory.mktemp("pki")
    make_ca(d / "ca")
    make_cert(d / "ca", "localhost", d / "server", ips=["127.0.0.1"])
    make_cert(d / "ca", "controller", d / "client", client=True)
    make_ca(d / "other")
    return d


def agent_app() -> FastAPI:
    return create_app(MemoryDriver("host1", MemoryCloud(), "127.0.0.1"), AGENT_TOKEN, "127.0.0.1", JobRunner())


def server_tls(pki: Path, client_ca: bool = False) -> ServerTLS:
    return ServerTLS(str(pki / "server.pem"), str(pki / "server-key.pem"),
                     str(pki / "ca/ca.pem") if client_ca else None)


def agent_client(url: str, **kw: object) -> AgentClient:
    return AgentClient("host1", url, AGENT_TOKEN, timeout=5.0, retry_seconds=0, **kw)  # type: ignore[arg-type]


# The controller's agent client ---------------------------------------------------------------

def test_an_agent_client_that_trusts_the_ca_gets_answers(pki):
    with serve(agent_app(), server_tls(pki)) as url, agent_client(url, ca_file=str(pki / "ca/ca.pem")) as c:
        assert c.host().hostname == "host1"


def test_an_agent_client_with_another_ca_refuses_the_agent(pki):
    other = str(pki / "other/ca.pem")
    with serve(agent_app(), server_tls(pki)) as url, agent_client(url, ca_file=other) as c:
        with pytest.raises(AgentError) as e:
            c.host()
    msg = str(e.value)
    assert f"{url}/v1/host showed a certificate that the CA file {other} does not accept" in msg
    assert "check agent_ca" in msg and "\n" not in msg


def test_an_agent_with_a_client_ca_refuses_a_client_without_a_certificate(pki):
    ca = str(pki / "ca/ca.pem")
    with serve(agent_app(), server_tls(pki, client_ca=True)) as url:
        with agent_client(url, ca_file=ca) as c, pytest.raises(AgentError) as e:
            c.host()
        msg = str(e.value)
        assert f"{url}/v1/host closed the connection without an answer" in msg
        assert "set agent_client_cert and agent_client_key" in msg
        pair = (str(pki / "client.pem"), str(pki / "client-key.pem"))
        with agent_client(url, ca_file=ca, client_cert=pair) as c:
            assert c.host().hostname == "host1"


# The controller behind TLS, its agent too, and the CLI -----------------------------------------

@pytest.fixture(scope="module")
def stack(pki: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An agent requiring client certificates and a controller built from its settings, both over TLS."""
    with serve(agent_app(), server_tls(pki, client_ca=True)) as agent_url:
        config = ControllerConfig(
            token=TOKEN, database=f"sqlite:///{tmp_path_factory.mktemp('ctl') / 'controller.db'}",
            hosts=(HostConfig("host1", agent_url, "127.0.0.1", AGENT_TOKEN),), agent_retry_seconds=0,
            tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server-key.pem"), agent_ca=str(pki / "ca/ca.pem"),
            agent_client_cert=str(pki / "client.pem"), agent_client_key=str(pki / "client-key.pem"))
        assert config.serving_tls("controller.toml") == ServerTLS(config.tls_cert, config.tls_key)
        with serve(build(config).app, config.serving_tls("controller.toml")) as url:
            yield url


def test_the_cli_client_checks_the_controller_and_reaches_the_agent(pki, stack):
    client = ControllerClient(stack, TOKEN, ca_file=str(pki / "ca/ca.pem"))
    try:
        (host,) = client.hypervisors()
    finally:
        client.close()
    assert (host["name"], host["state"], host["error"]) == ("host1", "up", None)


@pytest.mark.parametrize("ca", ["other/ca.pem", None])
def test_the_cli_client_refuses_a_controller_its_ca_did_not_sign(pki, stack, ca):
    ca_file = str(pki / ca) if ca else None
    client = ControllerClient(stack, TOKEN, ca_file=ca_file)
    with pytest.raises(ClientError) as e:
        client.servers()
    client.close()
    trust = f"the CA file {ca_file}" if ca else "the system's trust store"
    assert str(e.value).startswith(f"the controller at {stack} showed a certificate that {trust} does not accept")
    assert "--ca-file" in str(e.value) and CA_ENV in str(e.value)


def test_the_cli_takes_the_ca_file_from_the_flag_or_the_environment(pki, stack, tmp_path, monkeypatch, capsys):
    for name in (URL_ENV, TOKEN_ENV, CONFIG_ENV, CA_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "token").write_text(TOKEN)
    flags = ["host", "list", "--url", stack, "--token-file", str(tmp_path / "token")]
    assert cli.main([*flags, "--ca-file", str(pki / "ca/ca.pem")]) == 0
    assert "host1" in capsys.readouterr().out
    monkeypatch.setenv(CA_ENV, str(pki / "other/ca.pem"))
    assert cli.main(flags) == 1
    assert f"the CA file {pki / 'other/ca.pem'} does not accept" in capsys.readouterr().err
    assert cli.main([*flags, "--ca-file", str(tmp_path / "missing.pem")]) == 1
    assert f"cannot use the CA file {tmp_path / 'missing.pem'}" in capsys.readouterr().err


# The settings' rules ---------------------------------------------------------------------------

def agent_toml(tmp_path: Path, lines: str) -> AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\ntoken = "a"\n{lines}\n')
    return AgentConfig.load(str(path))


def controller_toml(tmp_path: Path, lines: str, hosts: str = "") -> ControllerConfig:
    path = tmp_path / "controller.toml"
    path.write_text(f'[controller]\ntoken = "a"\n{lines}\n{hosts}')
    return ControllerConfig.load(str(path))


def test_relative_tls_files_are_next_to_the_config_file(pki, tmp_path, monkeypatch):
    for name in ("server.pem", "server-key.pem"):
        (tmp_path / name).write_bytes((pki / name).read_bytes())
    (tmp_path / "ca.pem").write_bytes((pki / "ca/ca.pem").read_bytes())
    monkeypatch.chdir(pki)
    c = agent_toml(tmp_path, 'tls_cert = "server.pem"\ntls_key = "server-key.pem"\ntls_client_ca = "ca.pem"')
    assert c.serving_tls("agent.toml") == ServerTLS(str(tmp_path / "server.pem"), str(tmp_path / "server-key.pem"),
                                                    str(tmp_path / "ca.pem"))
    assert c.tls is not None and c.tls.uvicorn_options()["ssl_cert_reqs"] == 2  # ssl.CERT_REQUIRED


def test_a_server_without_tls_or_plain_http_refuses_to_start(tmp_path, capsys):
    with pytest.raises(ConfigError) as e:
        agent_toml(tmp_path, "").serving_tls("agent.toml")
    assert str(e.value) == ("[agent] has neither tls_cert and tls_key nor plain_http = true in agent.toml: set "
                            "tls_cert and tls_key (make them with 'coldferry tls make-ca' and 'coldferry tls "
                            "make-cert' (see 'coldferry tls --help')), or plain_http = true to send the tokens in "
                            "the clear")
    path = tmp_path / "agent.toml"
    assert cli.main(["agent", "--config", str(path)]) == 2  # before any socket is bound
    assert "[agent] has neither tls_cert and tls_key nor plain_http" in capsys.readouterr().err
    with pytest.raises(ControllerConfigError, match=r"\[controller\] has neither tls_cert and tls_key"):
        controller_toml(tmp_path, "").serving_tls("controller.toml")


def test_plain_http_serves_with_a_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert agent_toml(tmp_path, "plain_http = true").serving_tls("agent.toml") is None
    assert "plain_http = true in agent.toml: serving plain HTTP, so the bearer tokens cross the network in the " \
           "clear" in caplog.text


HOST = '[[hosts]]\nname = "h1"\nagent_url = "{url}"\naddress = "198.18.0.11"\nagent_token = "t"\n'


def test_an_http_agent_url_needs_plain_http(pki, tmp_path, caplog):
    tls = f'tls_cert = "{pki}/server.pem"\ntls_key = "{pki}/server-key.pem"'
    c = controller_toml(tmp_path, tls, HOST.format(url="http://198.18.0.11:8797"))
    with pytest.raises(ControllerConfigError) as e:
        c.serving_tls("controller.toml")
    assert str(e.value).startswith("[[hosts]] h1: agent_url is http:// in controller.toml: use https://")
    c = controller_toml(tmp_path, "plain_http = true", HOST.format(url="http://198.18.0.11:8797"))
    with caplog.at_level(logging.WARNING):
        assert c.serving_tls("controller.toml") is None
    assert "the agents of h1 are reached over plain HTTP" in caplog.text
    assert controller_toml(tmp_path, tls, HOST.format(url="https://198.18.0.11:8797")).tls is not None


@pytest.mark.parametrize("table, lines, words", [
    ("agent", 'tls_cert = "{pki}/server.pem"', "[agent] sets tls_cert without tls_key in "),
    ("agent", 'tls_key = "{pki}/server-key.pem"', "[agent] sets tls_key without tls_cert in "),
    ("agent", 'tls_cert = "{pki}/server.pem"\ntls_key = "{pki}/client-key.pem"',
     "[agent] tls_key {pki}/client-key.pem is not the key of tls_cert {pki}/server.pem in "),
    ("agent", 'tls_cert = "{pki}/server-key.pem"\ntls_key = "{pki}/server-key.pem"',
     "[agent] tls_cert: {pki}/server-key.pem holds no PEM certificate in "),
    ("agent", 'tls_cert = "{pki}/server.pem"\ntls_key = "{pki}/server.pem"',
     "[agent] tls_key: {pki}/server.pem holds no PEM private key in "),
    ("agent", 'tls_cert = "{pki}/nope.pem"\ntls_key = "{pki}/server-key.pem"',
     "[agent] tls_cert: cannot read {pki}/nope.pem in "),
    ("agent", 'tls_cert = "{pki}/server.pem"\ntls_key = "{pki}/server-key.pem"\nplain_http = true',
     "[agent] sets both tls_cert and plain_http = true in "),
    ("agent", 'tls_client_ca = "{pki}/ca/ca.pem"', "[agent] sets tls_client_ca without tls_cert and tls_key in "),
    ("controller", 'agent_ca = "{pki}/server-key.pem"',
     "[controller] agent_ca: {pki}/server-key.pem holds no PEM certificate"),
    ("controller", 'agent_ca = "missing.pem"', "[controller] agent_ca: cannot read {tmp}/missing.pem in "),
    ("controller", 'agent_client_cert = "{pki}/client.pem"',
     "[controller] sets agent_client_cert without agent_client_key"),
    ("controller", 'agent_client_cert = "{pki}/client.pem"\nagent_client_key = "{pki}/server-key.pem"',
     "[controller] agent_client_key {pki}/server-key.pem is not the key of agent_client_cert {pki}/client.pem"),
    ("controller", 'tls_key = "{pki}/server-key.pem"', "[controller] sets tls_key without tls_cert"),
])
def test_tls_mistakes_are_refused_at_load(pki, tmp_path, table, lines, words):
    load = agent_toml if table == "agent" else controller_toml
    with pytest.raises(SettingsError) as e:
        load(tmp_path, lines.format(pki=pki))
    assert words.format(pki=pki, tmp=tmp_path) in str(e.value) and "\n" not in str(e.value)


# The certificate command ------------------------------------------------------------------------

def test_keys_are_private_and_a_ca_is_never_replaced(pki):
    assert stat.S_IMODE((pki / "ca/ca-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((pki / "server-key.pem").stat().st_mode) == 0o600
    with pytest.raises(TLSCommandError, match="already exist: remove them first"):
        make_ca(pki / "ca")
    with pytest.raises(TLSCommandError, match="give --replace"):
        make_cert(pki / "ca", "localhost", pki / "server")


def test_a_server_certificate_names_its_host_and_a_client_certificate_is_for_clients(pki, tmp_path):
    files = make_cert(pki / "ca", "host1", tmp_path / "host1", dns=["host1.lab"], ips=["198.18.0.11", "::1"],
                      key_type="rsa")
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["host1", "host1.lab"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["198.18.0.11", "::1"]
    assert 364 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 366
    client = x509.load_pem_x509_certificate((pki / "client.pem").read_bytes())
    usage = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert [u._name for u in usage] == ["clientAuth"]
    with pytest.raises(TLSCommandError, match="--ip 'host1' is not an IP address"):
        make_cert(pki / "ca", "x", tmp_path / "x", ips=["host1"])
    with pytest.raises(TLSCommandError, match="cannot read the CA in"):
        make_cert(tmp_path / "no-ca", "x", tmp_path / "x")
    with pytest.raises(TLSCommandError, match="--days 0: a certificate must be valid for a day at least"):
        make_cert(pki / "ca", "x", tmp_path / "x", days=0)


def test_the_tls_command_explains_the_steps(capsys):
    with pytest.raises(SystemExit):
        cli.main(["tls", "--help"])
    out = capsys.readouterr().out
    for words in ("make-ca", "make-cert", "--ip", "tls_cert", "agent_ca", "tls_client_ca", "--ca-file"):
        assert words in out
