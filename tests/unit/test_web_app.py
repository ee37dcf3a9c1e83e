"""The dashboard over an in-memory controller: login, roles, CSRF, the actions and what pages show."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from controller import records
from controller.records import MigrationStatus, MigrationType
from controller.config import UserConfig
from controller.web.auth import Users
from controller.web.context import Dashboard
from controller.web.passwords import hash_password
from controller.web.render import Renderer
from controller.web.app import create_dashboard
from controller.web.throttle import LoginThrottle
from driver.model import PowerState
from tests.unit.controller_env import Env
from tests.unit.test_controller_api import wait_drain

VM = "00000000-0000-4000-8000-0000000000b1"
OFF = "00000000-0000-4000-8000-0000000000b2"
PAUSED = "00000000-0000-4000-8000-0000000000b3"
USERS = (UserConfig("ada", hash_password("ada-pw", n=2, r=1, p=1), "admin"),
         UserConfig("rex", hash_password("rex-pw", n=2, r=1, p=1), "reader"))
TOKEN_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = Env.make(tmp_path, n=2, users=USERS, session_secret="unit-test-session-secret")
    e.add("host1", VM, "web")
    e.add("host1", OFF, "db", PowerState.SHUTDOWN)
    e.add("host1", PAUSED, "cache", PowerState.PAUSED)
    return e


def client(env: Env) -> TestClient:
    assert env.ctl is not None
    return TestClient(env.ctl.app, follow_redirects=False)


def token(c: TestClient, path: str = "/ui/login") -> str:
    found = TOKEN_FIELD.search(c.get(path).text)
    assert found, f"no CSRF field on {path}"
    return found.group(1)


def login(env: Env, name: str, password: str) -> tuple[TestClient, str]:
    """A client logged in as ``name`` and its session's CSRF token."""
    c = client(env)
    r = c.post("/ui/login", data={"csrf_token": token(c), "name": name, "password": password,
                                  "next": "/drains"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/drains", r.text
    return c, token(c, "/ui/drains")


def service(env: Env, host: str) -> tuple[bool, str | None]:
    rec = env.ctl.store.get_host(host)  # type: ignore[union-attr]
    assert rec is not None
    return rec.enabled, rec.disabled_reason


def test_without_a_session_pages_lead_to_the_login_and_the_rest_is_401(env: Env) -> None:
    c = client(env)
    r = c.get("/ui/migrations?status=finished")
    assert r.status_code == 303 and r.headers["location"] == "/ui/login?next=%2Fmigrations%3Fstatus%3Dfinished"
    assert c.get("/ui/api/drains/1").status_code == 401
    assert c.get("/ui/api/drains/1").json()["detail"].startswith("your session has ended")
    r = c.post("/ui/hypervisors/host1/disable", data={"reason": "x", "csrf_token": token(c)})
    assert r.status_code == 401 and service(env, "host1") == (True, None)
    assert c.get("/", follow_redirects=True).url.path == "/ui/login"


def test_the_json_api_is_unchanged(env: Env) -> None:
    c = client(env)
    assert c.get("/v1/os-hypervisors").status_code == 401
    assert not [p for p in c.get("/openapi.json").json()["paths"] if not p.startswith("/v1/")]
    assert env.api().get("/v1/os-hypervisors").status_code == 200


def test_login_refuses_a_wrong_password_an_unknown_user_and_a_missing_token(env: Env) -> None:
    c = client(env)
    for name, password in [("ada", "wrong"), ("nobody", "ada-pw"), ("ada", "")]:
        r = c.post("/ui/login", data={"csrf_token": token(c), "name": name, "password": password})
        assert r.status_code == 401 and "wrong name or password" in r.text
    r = c.post("/ui/login", data={"name": "ada", "password": "ada-pw"})
    assert r.status_code == 403 and "security token" in r.text
    assert c.get("/ui/hypervisors").status_code == 303


def test_login_goes_back_to_where_it_was_asked_but_never_off_the_site(env: Env) -> None:
    for asked, lands in [("/migrations?status=error", "/ui/migrations?status=error"),
                         ("//evil.example/", "/ui/hypervisors"), ("https://evil.example/", "/ui/hypervisors"),
                         ("/\\evil.example", "/ui/hypervisors"), ("", "/ui/hypervisors")]:
        c = client(env)
        r = c.post("/ui/login", data={"csrf_token": token(c), "name": "ada", "password": "ada-pw",
                                      "next": asked})
        assert r.headers["location"] == lands, asked


def test_the_session_cookie_and_the_security_headers(env: Env) -> None:
    c = client(env)
    r = c.get("/ui/login")
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store" and r.headers["x-frame-options"] == "DENY"
    assert "no-store" not in c.get("/ui/static/dashboard.js").headers.get("cache-control", "")


def test_admin_disables_and_enables_a_service(env: Env) -> None:
    c, tok = login(env, "ada", "ada-pw")
    r = c.post("/ui/hypervisors/host1/disable", data={"csrf_token": tok, "reason": "disk swap"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/hypervisors"
    assert service(env, "host1") == (False, "disk swap")
    page = c.get("/ui/hypervisors").text
    assert "host1: service disabled" in page and "disk swap" in page and "Migrate Instances" in page
    r = c.post("/ui/hypervisors/host1/enable", data={"csrf_token": tok})
    assert r.status_code == 303 and service(env, "host1") == (True, None)


def test_disable_needs_a_reason_and_a_known_host(env: Env) -> None:
    c, tok = login(env, "ada", "ada-pw")
    c.post("/ui/hypervisors/host1/disable", data={"csrf_token": tok, "reason": "  "})
    assert service(env, "host1") == (True, None)
    assert "say why host1" in c.get("/ui/hypervisors").text
    c.post("/ui/hypervisors/host9/disable", data={"csrf_token": tok, "reason": "gone"})
    assert "host host9 not found" in c.get("/ui/hypervisors").text


def test_migrate_instances_is_offered_only_on_a_disabled_host(env: Env) -> None:
    c, tok = login(env, "ada", "ada-pw")
    assert 'data-open="migrate-host1"' not in c.get("/ui/hypervisors").text
    c.post("/ui/hypervisors/host1/disable", data={"csrf_token": tok, "reason": "maintenance"})
    page = c.get("/ui/hypervisors").text
    assert 'data-open="migrate-host1"' in page and 'data-open="disable-host1"' not in page


def test_a_drain_from_the_form_and_its_results(env: Env) -> None:
    c, tok = login(env, "ada", "ada-pw")
    r = c.post("/ui/hypervisors/host1/drain", data={"csrf_token": tok, "mode": "live", "max_servers": "2",
                                                    "target_host": ""})
    assert r.status_code == 303 and (m := re.fullmatch(r"/ui/drains/(\d+)", r.headers["location"]))
    wait_drain(env.api(), int(m.group(1)))
    d = c.get(f"/ui/api/drains/{m.group(1)}").json()
    assert (d["live"], d["max_servers"], d["dry_run"], d["target_host"]) == (True, 2, False, None)
    rows = {row["name"]: row for row in d["rows"]}
    assert rows["web"]["status"] == "done" and rows["web"]["migration_type"] == MigrationType.LIVE
    assert rows["db"]["status"] == "done" and rows["db"]["migration_type"] == MigrationType.COLD
    assert rows["cache"]["status"] == "error" and "paused" in rows["cache"]["error"]
    page = c.get(r.headers["location"]).text
    assert 'data-total="done">2<' in page and 'data-total="error">1<' in page
    assert "unpause it or shut it off" in page


def test_drain_form_options_reach_the_drainer(env: Env) -> None:
    c, tok = login(env, "ada", "ada-pw")
    r = c.post("/ui/hypervisors/host1/drain", data={"csrf_token": tok, "mode": "cold", "max_servers": "3",
                                                    "target_host": "host2", "force": "on", "dry_run": "on"})
    d = c.get("/ui/api/drains/" + r.headers["location"].rsplit("/", 1)[1]).json()
    assert (d["live"], d["max_servers"], d["dry_run"], d["target_host"], d["force"]) == (False, 3, True, "host2", True)
    assert {row["status"] for row in d["rows"]} == {"planned", "error"}


@pytest.mark.parametrize("form, text", [
    ({"max_servers": "0"}, "max_servers must be from 1 to 64"),
    ({"max_servers": "lots"}, "max_servers must be a whole number"),
    ({"force": "on"}, "force needs a target host"),
    ({"target_host": "host1"}, "target host host1 is the source host"),
])
def test_a_refused_drain_comes_back_with_the_reason(env: Env, form: dict[str, str], text: str) -> None:
    c, tok = login(env, "ada", "ada-pw")
    r = c.post("/ui/hypervisors/host1/drain", data={"csrf_token": tok, **form})
    assert r.headers["location"] == "/ui/hypervisors"
    assert text in c.get("/ui/hypervisors").text
    assert env.ctl.store.list_drains() == []  # type: ignore[union-attr]


def test_confirm_and_revert_from_the_migrations_page(env: Env) -> None:
    c, tok = login(env, "ada", "ada-pw")
    mid = env.conductor.migrate(OFF, "host2", False).id
    env.wait(mid)
    page = c.get("/ui/migrations?status=finished").text
    assert f'action="/ui/migrations/{mid}/confirm"' in page and f'action="/ui/migrations/{mid}/revert"' in page
    r = c.post(f"/ui/migrations/{mid}/confirm", data={"csrf_token": tok, "next": "/migrations?status=finished"})
    assert r.headers["location"] == "/ui/migrations?status=finished"
    assert env.wait(mid, frozenset(records.FINAL)).status == MigrationStatus.CONFIRMED
    c.post(f"/ui/migrations/{mid}/revert", data={"csrf_token": tok})
    assert "only a finished migration" in c.get("/ui/migrations").text


def test_migration_filters(env: Env) -> None:
    c, _ = login(env, "ada", "ada-pw")
    mid = env.conductor.migrate(OFF, "host2", False).id
    env.wait(mid)
    assert f'data-migration="{mid}"' in c.get("/ui/migrations?host=host2&status=finished&server=db").text
    for query in ["status=error", "host=host9", "migration_type=live-migration", "server=web"]:
        page = c.get(f"/ui/migrations?{query}").text
        assert f'data-migration="{mid}"' not in page and "match these filters" in page, query
    assert f'data-migration="{mid}"' in c.get("/ui/migrations?status=bogus").text


def test_a_reader_sees_everything_and_can_change_nothing(env: Env) -> None:
    env.ctl.store.set_service("host1", False, "maintenance")  # type: ignore[union-attr]
    mid = env.conductor.migrate(OFF, "host2", False).id
    env.wait(mid)
    c, tok = login(env, "rex", "rex-pw")
    hv, migs = c.get("/ui/hypervisors").text, c.get("/ui/migrations").text
    assert "maintenance" in hv and f'data-migration="{mid}"' in migs
    for page in (hv, migs):
        assert "data-open=" not in page and "/enable" not in page and "/confirm" not in page
    for path, form in [("/ui/hypervisors/host1/enable", {}), ("/ui/hypervisors/host2/disable", {"reason": "x"}),
                       ("/ui/hypervisors/host1/drain", {}), (f"/ui/migrations/{mid}/confirm", {}),
                       (f"/ui/migrations/{mid}/revert", {})]:
        r = c.post(path, data={"csrf_token": tok, **form})
        assert r.status_code == 403 and "only an admin" in r.text, path
    assert service(env, "host1") == (False, "maintenance") and service(env, "host2") == (True, None)
    assert env.ctl.store.list_drains() == []  # type: ignore[union-attr]
    assert env.conductor.get(mid).status == MigrationStatus.FINISHED


@pytest.mark.parametrize("sent", [None, "", "not-the-token"])
def test_an_admin_post_without_the_sessions_token_is_refused(env: Env, sent: str | None) -> None:
    c, _ = login(env, "ada", "ada-pw")
    form = {"reason": "forged"} if sent is None else {"reason": "forged", "csrf_token": sent}
    r = c.post("/ui/hypervisors/host1/disable", data=form)
    assert r.status_code == 403 and "security token" in r.text
    assert service(env, "host1") == (True, None)


def test_a_token_from_another_session_is_refused(env: Env) -> None:
    c, _ = login(env, "ada", "ada-pw")
    _, other = login(env, "ada", "ada-pw")
    assert c.post("/ui/hypervisors/host1/disable", data={"csrf_token": other, "reason": "x"}).status_code == 403


def test_the_login_token_is_worthless_after_the_login(env: Env) -> None:
    c = client(env)
    before = token(c)
    c.post("/ui/login", data={"csrf_token": before, "name": "ada", "password": "ada-pw"})
    assert c.post("/ui/hypervisors/host1/disable", data={"csrf_token": before, "reason": "x"}).status_code == 403


def test_logout_needs_the_token_and_ends_the_session(env: Env) -> None:
    c, tok = login(env, "ada", "ada-pw")
    assert c.post("/ui/logout", data={}).status_code == 403
    r = c.post("/ui/logout", data={"csrf_token": tok})
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"
    assert c.get("/ui/hypervisors").status_code == 303


def test_the_role_is_read_from_the_configuration_on_every_request(env: Env) -> None:
    c, tok = login(env, "ada", "ada-pw")
    env.config = dataclasses.replace(env.config, users=(UserConfig("ada", USERS[0].password_hash, "reader"),))
    env.start_controller()
    # Sessions live in the controller: a restart ends them all, even with the same session secret.
    replayed = client(env)
    replayed.cookies = c.cookies
    assert replayed.get("/ui/hypervisors").status_code == 303
    demoted, tok = login(env, "ada", "ada-pw")
    assert demoted.post("/ui/hypervisors/host1/enable", data={"csrf_token": tok}).status_code == 403
    env.config = dataclasses.replace(env.config, users=())
    env.start_controller()
    gone = client(env)
    assert gone.post("/ui/login", data={"csrf_token": token(gone), "name": "ada", "password": "ada-pw"}
                     ).status_code == 401
    assert "No dashboard users are configured" in gone.get("/ui/login").text


def test_text_from_agents_and_users_is_escaped(env: Env) -> None:
    c, tok = login(env, "ada", "ada-pw")
    c.post("/ui/hypervisors/host1/disable", data={"csrf_token": tok, "reason": "<script>alert(1)</script>"})
    page = c.get("/ui/hypervisors").text
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_unknown_drain_and_malformed_addresses(env: Env) -> None:
    c, _ = login(env, "ada", "ada-pw")
    r = c.get("/ui/drains/99")
    assert r.status_code == 404 and "drain 99 not found" in r.text
    assert c.get("/ui/api/drains/99").json() == {"detail": "drain 99 not found"}
    assert c.get("/ui/drains/first").status_code == 400


HUGE = "99999999999999999999"


def test_an_id_no_record_can_have_is_404_on_pages_and_refused_on_actions(env: Env) -> None:
    c, tok = login(env, "ada", "ada-pw")
    c = TestClient(env.ctl.app, follow_redirects=False, raise_server_exceptions=False, cookies=c.cookies)
    for path in (f"/ui/drains/{HUGE}", f"/ui/api/drains/{HUGE}", f"/ui/drains/{2 ** 63}", "/ui/drains/-1"):
        r = c.get(path)
        assert r.status_code == 404 and "not found" in r.text, (path, r.status_code)
    for verb in ("confirm", "revert"):
        r = c.post(f"/ui/migrations/{HUGE}/{verb}", data={"csrf_token": tok})
        assert r.status_code == 303, (verb, r.status_code)
        assert f"migration {HUGE} not found" in c.get("/ui/migrations").text


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttled(env: Env, clock: Clock, address: str = "198.51.100.7") -> TestClient:
    """A client of a dashboard whose login throttle runs on ``clock``, from ``address``."""
    assert env.ctl is not None
    d = Dashboard(env.conductor, env.ctl.drainer, env.ctl.store, Users(USERS, max_age=3600), Renderer(),
                  throttle=LoginThrottle(clock=clock))
    app = FastAPI()
    app.mount("/ui", create_dashboard(d, "unit-test-session-secret", 3600))
    return TestClient(app, follow_redirects=False, client=(address, 40000))


def try_login(c: TestClient, name: str, password: str) -> httpx.Response:
    return c.post("/ui/login", data={"csrf_token": token(c), "name": name, "password": password})


def test_logins_are_throttled_per_name_with_a_growing_delay(env: Env) -> None:
    clock = Clock()
    c = throttled(env, clock)
    for _ in range(5):
        assert try_login(c, "ada", "guess").status_code == 401
    r = try_login(c, "ada", "ada-pw")
    assert r.status_code == 429 and "too many failed logins" in r.text and "try again in 30 seconds" in r.text
    assert r.headers["retry-after"] == "30"
    other = TestClient(c.app, follow_redirects=False, client=("203.0.113.9", 40000))
    assert try_login(other, "ada", "ada-pw").status_code == 429    # the name is throttled from anywhere
    assert try_login(other, "rex", "rex-pw").status_code == 303    # other names are not
    clock.now += 29
    assert try_login(c, "ada", "ada-pw").status_code == 429
    clock.now += 1
    assert try_login(c, "ada", "guess").status_code == 401
    r = try_login(c, "ada", "ada-pw")
    assert r.status_code == 429 and "try again in 60 seconds" in r.text   # the delay doubles
    clock.now += 60
    assert try_login(c, "ada", "ada-pw").status_code == 303
    c.cookies.clear()
    assert try_login(c, "ada", "guess").status_code == 401   # a success starts the count again


def test_logins_are_throttled_per_client_address(env: Env) -> None:
    clock = Clock()
    c = throttled(env, clock)
    for name in ("root", "admin", "ada", "rex", "bob"):
        assert try_login(c, name, "guess").status_code == 401
    r = try_login(c, "rex", "rex-pw")
    assert r.status_code == 429 and "try again in 30 seconds" in r.text
    elsewhere = TestClient(c.app, follow_redirects=False, client=("203.0.113.9", 40000))
    assert try_login(elsewhere, "rex", "rex-pw").status_code == 303
    clock.now += 30
    assert try_login(c, "rex", "rex-pw").status_code == 303


def test_failures_long_ago_are_forgotten(env: Env) -> None:
    clock = Clock()
    c = throttled(env, clock)
    for _ in range(4):
        assert try_login(c, "ada", "guess").status_code == 401
    clock.now += 901    # past the window: the four are forgotten
    assert try_login(c, "ada", "guess").status_code == 401
    assert try_login(c, "ada", "ada-pw").status_code == 303


def test_the_default_throttle_refuses_a_burst_of_guesses(env: Env) -> None:
    c = client(env)
    codes = [try_login(c, "ada", f"guess{i}").status_code for i in range(20)]
    assert codes[:5] == [401] * 5 and set(codes[5:]) == {429}
    assert try_login(c, "ada", "ada-pw").status_code == 429


def test_a_logged_out_cookie_is_dead(env: Env) -> None:
    c, tok = login(env, "ada", "ada-pw")
    copied = dict(c.cookies)
    assert c.post("/ui/logout", data={"csrf_token": tok}).status_code == 303
    replay = client(env)
    replay.cookies = copied
    assert replay.get("/ui/hypervisors").status_code == 303
    assert replay.get("/ui/api/drains/1").status_code == 401
    r = replay.post("/ui/hypervisors/host1/disable", data={"csrf_token": tok, "reason": "replayed"})
    assert r.status_code == 401 and service(env, "host1") == (True, None)
    r = replay.post("/ui/logout", data={"csrf_token": tok})
    assert r.status_code == 401


def test_logging_out_ends_only_that_session(env: Env) -> None:
    first, tok = login(env, "ada", "ada-pw")
    second, _ = login(env, "ada", "ada-pw")
    first.post("/ui/logout", data={"csrf_token": tok})
    assert second.get("/ui/hypervisors").status_code == 200


@pytest.mark.parametrize("base_url, secure", [("https://testserver", True), ("http://testserver", False)])
def test_the_session_cookie_is_secure_over_https(env: Env, base_url: str, secure: bool) -> None:
    c = TestClient(env.ctl.app, base_url=base_url, follow_redirects=False)
    r = c.get("/ui/login")
    assert ("secure" in r.headers["set-cookie"].lower().split("; ")) is secure, r.headers["set-cookie"]
    r = c.post("/ui/login", data={"csrf_token": token(c), "name": "ada", "password": "ada-pw"})
    assert r.status_code == 303 and ("secure" in r.headers["set-cookie"].lower().split("; ")) is secure


def test_the_session_cookie_can_be_made_secure_always(env: Env) -> None:
    d = Dashboard(env.conductor, env.ctl.drainer, env.ctl.store, Users(USERS, max_age=3600), Renderer())
    app = FastAPI()
    app.mount("/ui", create_dashboard(d, "unit-test-session-secret", 3600, secure_cookie=True))
    r = TestClient(app).get("/ui/login")
    assert "secure" in r.headers["set-cookie"].lower().split("; ")
