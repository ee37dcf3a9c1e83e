"""The CLI's controller client: settings resolution, requests, errors, the --wait loop.

Requests go to an in-memory controller (``FakeController``) through
httpx.MockTransport; ``test_cli_commands`` drives the commands with the same
fake by replacing ``client.open_client`` and ``client.make_waiter``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from coldferry import cli, client
from coldferry.client import (CA_ENV, CONFIG_ENV, DEFAULT_URL, TOKEN_ENV, URL_ENV, ClientError, ControllerClient, Waiter,
                              resolve_settings)

from .fakes import FakeClock

URL = "http://controller.test:8798"


class FakeController:
    """Canned answers per (method, path); each call takes the next answer, the last one repeats."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], list[Any]] = {}
        self.requests: list[httpx.Request] = []
        self.opened: list[tuple[str, str]] = []
        self.ca_files: list[str | None] = []
        self.clock = FakeClock()  # starts at 1000

    def on(self, method: str, path: str, *answers: Any) -> None:
        """Each answer: a JSON body (200), a (status, body) pair, or an exception to raise."""
        self.routes[(method, path)] = list(answers)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answers = self.routes.get((request.method, request.url.path))
        if not answers:
            return httpx.Response(404, json={"detail": f"no route {request.method} {request.url.path}"})
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, Exception):
            raise answer
        status, body = answer if isinstance(answer, tuple) else (200, answer)
        return httpx.Response(status, json=body)

    def open(self, url: str, token: str, ca_file: str | None = None) -> ControllerClient:
        self.opened.append((url, token))
        self.ca_files.append(ca_file)
        return ControllerClient(url, token, http=httpx.Client(transport=httpx.MockTransport(self.handle),
                                                              base_url=url))

    def waiter(self) -> Waiter:
        return Waiter(sleep=self.clock.sleep, clock=self.clock)

    def sent(self) -> list[tuple[str, str]]:
        return [(r.method, r.url.path) for r in self.requests]

    def body(self, index: int = -1) -> Any:
        return json.loads(self.requests[index].content)

    def query(self, index: int = -1) -> dict[str, str]:
        return dict(self.requests[index].url.params)


def install(monkeypatch: pytest.MonkeyPatch, home: Path) -> FakeController:
    """Route every command's client to a FakeController; settings from a clean environment and HOME."""
    fake = FakeController()
    monkeypatch.setattr(client, "open_client", fake.open)
    monkeypatch.setattr(client, "make_waiter", fake.waiter)
    for name in (URL_ENV, TOKEN_ENV, CONFIG_ENV, CA_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))  # the default config file is looked for under here
    return fake


@pytest.fixture
def fake(monkeypatch, tmp_path) -> FakeController:
    return install(monkeypatch, tmp_path)


@pytest.fixture
def api(fake) -> ControllerClient:
    return fake.open(URL, "s3cret")


def write_config(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# Settings ----------------------------------------------------------------------------------------

def token_file(tmp_path, token: str = "flag") -> str:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    return str(path)


def test_a_flag_wins_over_the_environment_and_the_file(tmp_path):
    cfg = write_config(tmp_path / "c.toml", '[client]\nurl = "http://file:1"\ntoken = "file"\n')
    env = {URL_ENV: "http://env:1", TOKEN_ENV: "env"}
    s = resolve_settings("http://flag:1", token_file(tmp_path), str(cfg), env)
    assert (s.url, s.token) == ("http://flag:1", "flag")


def test_the_environment_wins_over_the_file(tmp_path):
    cfg = write_config(tmp_path / "c.toml", '[client]\nurl = "http://file:1"\ntoken = "file"\n')
    s = resolve_settings(None, None, None, {URL_ENV: "http://env:1", TOKEN_ENV: "env", CONFIG_ENV: str(cfg)})
    assert (s.url, s.token) == ("http://env:1", "env")


def test_each_setting_is_resolved_on_its_own(tmp_path):
    cfg = write_config(tmp_path / "c.toml", '[client]\nurl = "http://file:1/"\ntoken = "file"\n')
    s = resolve_settings(None, token_file(tmp_path), str(cfg), {})
    assert (s.url, s.token) == ("http://file:1", "flag")  # trailing slash dropped


def test_the_default_config_file_and_a_token_file_next_to_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = write_config(tmp_path / ".config/coldferry/client.toml", '[client]\ntoken_file = "token"\n')
    (cfg.parent / "token").write_text("from-file\n")
    s = resolve_settings(None, None, None, {})
    assert (s.url, s.token) == (DEFAULT_URL, "from-file")


def test_without_a_token_the_error_names_all_three_ways(tmp_path):
    with pytest.raises(ClientError) as e:
        resolve_settings(None, None, str(write_config(tmp_path / "c.toml", "[client]\n")), {}, ask=lambda: None)
    msg = str(e.value)
    assert "--token-file" in msg and TOKEN_ENV in msg and "token_file" in msg and str(tmp_path / "c.toml") in msg
    assert "--client-config" in msg and CONFIG_ENV in msg


def test_a_named_config_file_must_exist(tmp_path):
    with pytest.raises(ClientError, match="does not exist"):
        resolve_settings(None, None, str(tmp_path / "missing.toml"), {})


def test_a_broken_default_file_does_not_matter_when_flags_say_everything(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write_config(tmp_path / ".config/coldferry/client.toml", "not toml [")
    assert resolve_settings("http://x:1", token_file(tmp_path, "t"), None, {}).token == "t"
    with pytest.raises(ClientError, match="cannot read client config"):
        resolve_settings(None, token_file(tmp_path, "t"), None, {})


@pytest.mark.parametrize("text, message", [
    ('[client]\ntokn = "x"\n', "unknown key 'tokn'"),
    ('[client]\ntoken = "x"\ntoken_file = "f"\n', "both token and token_file"),
    ('[client]\ntoken_file = "nope"\n', r"\[client\] token_file: cannot read .*/nope in "),
    ('[client]\ntoken_file = "empty"\n', r"\[client\] token_file: .*/empty is empty in .*: write the token into it"),
])
def test_config_file_mistakes_are_named(tmp_path, text, message):
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ClientError, match=message):
        resolve_settings(None, None, str(write_config(tmp_path / "c.toml", text)), {})


def test_commands_connect_with_the_flags_and_send_the_token(fake, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(URL_ENV, "http://env:1")
    monkeypatch.setenv(TOKEN_ENV, "env-token")
    fake.on("GET", "/v1/servers", {"servers": []})
    assert cli.main(["server", "list", "--url", URL, "--token-file", token_file(tmp_path, "flag-token")]) == 0
    assert fake.opened == [(URL, "flag-token")]
    assert fake.requests[0].headers["authorization"] == "Bearer flag-token"


def test_a_token_on_the_command_line_is_refused_before_anything_is_sent(fake, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["server", "list", "--url", URL, "--token", "flag-token"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "/proc/PID/cmdline" in err and TOKEN_ENV in err and "--token-file" in err
    assert "flag-token" not in err and fake.opened == []


def test_token_file_mistakes_are_named(tmp_path):
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ClientError, match=r"^--token-file: cannot read .*/nope: No such file"):
        resolve_settings("http://x:1", str(tmp_path / "nope"), None, {})
    with pytest.raises(ClientError, match=r"^--token-file: .*/empty is empty: write the token into it"):
        resolve_settings("http://x:1", str(tmp_path / "empty"), None, {})


def test_the_ca_file_from_the_flag_the_environment_or_next_to_the_config_file(tmp_path):
    cfg = write_config(tmp_path / "conf" / "c.toml", '[client]\nurl = "https://c:1"\ntoken = "t"\nca_file = "ca.pem"\n')
    assert resolve_settings(None, None, str(cfg), {}).ca_file == str(tmp_path / "conf" / "ca.pem")
    assert resolve_settings(None, None, str(cfg), {CA_ENV: "/env.pem"}).ca_file == "/env.pem"
    assert resolve_settings(None, None, str(cfg), {CA_ENV: "/env.pem"}, ca_file="/flag.pem").ca_file == "/flag.pem"
    # a plain http URL needs no CA: flags that say the rest leave the file unread
    write_config(cfg, "not toml [")
    assert resolve_settings("http://c:1", token_file(tmp_path), str(cfg), {}).ca_file is None


def test_commands_pass_the_ca_file_on(fake, tmp_path, capsys):
    fake.on("GET", "/v1/servers", {"servers": []})
    assert cli.main(["server", "list", "--url", URL, "--token-file", token_file(tmp_path), "--ca-file", "/ca.pem"]) == 0
    assert fake.ca_files == ["/ca.pem"]


def test_a_token_found_nowhere_is_asked_for(tmp_path):
    asked = []
    s = resolve_settings("http://x:1", None, str(write_config(tmp_path / "c.toml", "[client]\n")), {},
                         ask=lambda: asked.append(1) or "typed")
    assert s.token == "typed" and asked == [1]


def test_commands_read_the_client_config_named_by_the_environment(fake, monkeypatch, tmp_path, capsys):
    cfg = write_config(tmp_path / "c.toml", f'[client]\nurl = "{URL}"\ntoken = "file-token"\n')
    monkeypatch.setenv(CONFIG_ENV, str(cfg))
    fake.on("GET", "/v1/os-hypervisors", {"hypervisors": []})
    assert cli.main(["host", "list"]) == 0
    assert fake.opened == [(URL, "file-token")]


def test_a_command_without_a_token_fails_before_any_request(fake, capsys):
    assert cli.main(["server", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("coldferry: error: no controller token") and "COLDFERRY_TOKEN" in err
    assert fake.opened == []


# Requests and errors -----------------------------------------------------------------------------

def test_names_are_one_path_segment(fake, api):
    fake.on("GET", "/v1/servers/a/b", {"id": "a/b"})
    assert api.server("a/b") == {"id": "a/b"}
    assert fake.requests[-1].url.raw_path == b"/v1/servers/a%2Fb"  # not /v1/servers/a/b


def test_migration_filters_use_the_api_names_and_drop_unset_ones(fake, api):
    fake.on("GET", "/v1/os-migrations", {"migrations": [{"id": 3}]})
    assert api.migrations(status="error", changes_since="2026-11-23T00:00:00Z") == [{"id": 3}]
    assert fake.query() == {"status": "error", "changes-since": "2026-11-23T00:00:00Z"}


def test_drain_and_service_bodies(fake, api):
    fake.on("POST", "/v1/os-hypervisors/h1/drain", (202, {"id": 1}))
    fake.on("PUT", "/v1/os-services/h1", {"name": "h1"})
    api.drain("h1", max_servers=2)
    assert fake.body() == {"live": False, "max_servers": 2, "dry_run": False, "force": False}
    api.set_service("h1", enabled=False, reason="disk")
    assert fake.body() == {"status": "disabled", "disabled_reason": "disk"}
    api.set_service("h1", enabled=True)
    assert fake.body() == {"status": "enabled"}


@pytest.mark.parametrize("status", [400, 404, 409])
def test_a_refusal_carries_the_status_and_the_controllers_detail(fake, api, status):
    fake.on("GET", "/v1/os-migrations/7", (status, {"detail": "because"}))
    with pytest.raises(ClientError) as e:
        api.migration(7)
    assert (e.value.status, str(e.value)) == (status, "because")


def test_an_answer_that_is_not_the_controllers_still_says_what_came(fake, api):
    fake.handle = lambda request: httpx.Response(502, text="<html>Bad Gateway</html>")  # type: ignore[method-assign]
    api = fake.open(URL, "t")
    with pytest.raises(ClientError) as e:
        api.servers()
    assert e.value.status == 502 and "Bad Gateway" in str(e.value)


def test_connection_refused_names_the_url_and_how_to_set_it(fake, api):
    fake.on("GET", "/v1/servers", httpx.ConnectError("[Errno 111] Connection refused"))
    with pytest.raises(ClientError) as e:
        api.servers()
    assert e.value.status is None and e.value.transient
    assert URL in str(e.value) and "--url" in str(e.value) and URL_ENV in str(e.value)


# Waiting -----------------------------------------------------------------------------------------

def test_poll_stops_when_done_sleeping_the_interval(fake):
    answers = iter(["a", "b", "done"])
    seen: list[str] = []
    last = fake.waiter().poll(lambda: next(answers), lambda v: v == "done", 60, seen.append)
    assert (last, seen, fake.clock.sleeps) == ("done", ["a", "b", "done"], [1.0, 1.0])


def test_poll_gives_up_at_the_timeout(fake):
    last = fake.waiter().poll(lambda: "running", lambda v: False, 5, lambda v: None)
    assert last == "running" and fake.clock.now == 1005


def test_poll_is_bounded_even_when_the_clock_stands_still():
    calls: list[int] = []
    Waiter(sleep=lambda s: None, clock=lambda: 0.0).poll(lambda: calls.append(1), lambda v: False, 3,
                                                         lambda v: None)
    assert len(calls) == 4  # at 0, 1, 2 and 3 seconds


def test_poll_rides_out_a_controller_restart_but_not_a_refusal(fake, capsys):
    answers: list[Any] = [ClientError(None, "refused"), ClientError(503, "starting"), "done"]

    def fetch() -> Any:
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a
    assert fake.waiter().poll(fetch, lambda v: v == "done", 60, lambda v: None) == "done"
    assert "warning: refused; retrying" in capsys.readouterr().err

    def refused() -> Any:
        raise ClientError(404, "gone")
    with pytest.raises(ClientError, match="gone"):
        fake.waiter().poll(refused, lambda v: True, 60, lambda v: None)
