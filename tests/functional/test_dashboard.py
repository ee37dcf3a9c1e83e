"""The dashboard in a real browser: Debian's Chromium, driven by Playwright, against a
controller served by uvicorn on a loopback port over in-memory hosts (MemoryDrivers behind
real agent apps, as tests/unit/controller_env.py makes them).

Nothing is downloaded: Playwright's pip wheel carries its driver and the browser is
/usr/bin/chromium from scripts/install. Screenshots go to test-artifacts/screenshots/.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from controller.records import MigrationStatus
from controller.config import UserConfig
from controller.web.passwords import hash_password
from driver.model import PowerState
from tests.support.serve import serve
from tests.unit.controller_env import Env

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "test-artifacts" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
# Headless, as root in a container, and quiet: no update checks, sync or other calls home.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ADMIN, ADMIN_PW = "ada", "ada-password"
READER, READER_PW = "rex", "rex-password"
USERS = (UserConfig(ADMIN, hash_password(ADMIN_PW), "admin"),
         UserConfig(READER, hash_password(READER_PW), "reader"))
# Each disk copy takes copy_steps x STEP_DELAY seconds: long enough for the results page,
# which polls every second, to catch a migration in flight.
STEP_DELAY = 0.5
SERVERS = [("00000000-0000-4000-8000-0000000000c1", "web", PowerState.RUNNING),
           ("00000000-0000-4000-8000-0000000000c2", "api", PowerState.RUNNING),
           ("00000000-0000-4000-8000-0000000000c3", "db", PowerState.SHUTDOWN),
           ("00000000-0000-4000-8000-0000000000c4", "cache", PowerState.PAUSED)]


@dataclass
class Site:
    env: Env
    url: str   # the controller's root, http://127.0.0.1:PORT


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install, which installs Debian's chromium")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    env = Env.make(tmp_path, n=2, users=USERS, session_secret="functional-test-session-secret")
    for driver in env.drivers.values():
        driver.step_delay = STEP_DELAY
    for uuid, name, state in SERVERS:
        env.add("host1", uuid, name, state)
    assert env.ctl is not None
    with serve(env.ctl.app) as url:
        yield Site(env, url)


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 640})
    context.set_default_timeout(15_000)
    p = context.new_page()
    yield p
    # The last view of every test, pass or fail, for whoever reads the artifacts.
    with contextlib.suppress(Exception):
        shot(p, f"{request.node.name}-last")
    context.close()


def shot(page: Page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def log_in(page: Page, site: Site, name: str, password: str) -> None:
    page.goto(site.url + "/")
    expect(page).to_have_url(re.compile(r"/ui/login\?next="))
    page.get_by_label("Name").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("heading", name="Hypervisors")).to_be_visible()
    expect(page.locator(".who .user")).to_contain_text(name)


def page_token(page: Page) -> str:
    """The session's CSRF token as the page carries it (every page has the logout form)."""
    value = page.locator('.who input[name="csrf_token"]').get_attribute("value")
    assert value
    return value


def result_row(name: str) -> str:
    """The selector of a server's row on the results page."""
    uuid = next(u for u, n, _ in SERVERS if n == name)
    return f'#results tr[data-server="{uuid}"]'


def test_admin_disables_drains_and_confirms(site: Site, page: Page) -> None:
    log_in(page, site, ADMIN, ADMIN_PW)
    host1 = page.locator('tr[data-host="host1"]')
    expect(host1.locator(".state")).to_have_text("up")
    expect(host1.locator(".instances")).to_have_text("4")
    expect(host1.get_by_role("button", name="Migrate Instances")).to_have_count(0)
    shot(page, "01-hypervisors")

    host1.get_by_role("button", name="Disable Service").click()
    dialog = page.locator("dialog#disable-host1")
    expect(dialog).to_be_visible()
    dialog.get_by_label("Reason").fill("disk swap, ticket OPS-1234")
    shot(page, "02-disable-service")
    dialog.get_by_role("button", name="Disable Service").click()
    expect(page.locator(".flash-ok")).to_have_text("host1: service disabled")
    expect(host1.locator(".service")).to_contain_text("disabled")
    expect(host1.locator(".service .reason")).to_have_text("disk swap, ticket OPS-1234")

    host1.get_by_role("button", name="Migrate Instances").click()
    dialog = page.locator("dialog#migrate-host1")
    expect(dialog).to_be_visible()
    dialog.get_by_label("Live-migrate running instances").check()
    expect(dialog.get_by_label("Force")).to_be_disabled()   # no target host chosen
    dialog.get_by_label("Maximum parallel migrations").fill("2")
    shot(page, "03-migrate-instances")
    dialog.get_by_role("button", name="Migrate").click()

    expect(page).to_have_url(re.compile(r"/ui/drains/\d+$"))
    expect(page.locator("[data-total=total]")).to_have_text("4")
    # Live: a row in flight shows its progress bar, filled by the page's polling.
    moving = page.locator("#results tr.row-migrating progress:not([hidden])")
    expect(moving.first).to_be_visible()
    expect(page.locator("#results tr.row-migrating [data-field=percent]").first).to_have_text(re.compile(r"\d+%"))
    shot(page, "04-drain-results-migrating")

    expect(page.locator("[data-drain-status]")).to_have_text("done", timeout=60_000)
    for name in ("web", "api", "db"):
        row = page.locator(result_row(name))
        expect(row.locator("[data-field=status] .badge")).to_have_text("done")
        expect(row.locator("[data-field=migration] a")).to_have_text(re.compile(r"#\d+"))
    paused = page.locator(result_row("cache"))
    expect(paused.locator("[data-field=status] .badge")).to_have_text("error")
    expect(paused.locator("[data-field=error]")).to_have_text(
        "server is paused: unpause it or shut it off, then migrate it; it was not moved")
    expect(page.locator("[data-total=done]")).to_have_text("3")
    expect(page.locator("[data-total=error]")).to_have_text("1")
    expect(page.locator("[data-total=migrating]")).to_have_text("0")
    shot(page, "05-drain-results-done")

    page.get_by_role("link", name="Migrations").click()
    page.get_by_label("Status").select_option("finished")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"status=finished"))
    rows = page.locator("#migrations tbody tr[data-migration]")
    expect(rows).to_have_count(1)   # db went cold and waits for confirm; the live ones completed
    db = rows.first
    expect(db).to_have_attribute("data-server-name", "db")
    shot(page, "06-migrations-finished")
    db.get_by_role("button", name="Confirm").click()
    expect(page.locator(".flash-ok")).to_contain_text("confirm started")
    page.get_by_label("Status").select_option("")
    page.get_by_label("Server").fill("db")
    page.get_by_role("button", name="Filter").click()
    # The list reloads itself while the confirm is under way.
    expect(page.locator("#migrations tr[data-server-name=db] .status .badge")).to_have_text("confirmed")
    shot(page, "07-migrations-confirmed")
    where = site.env.where(SERVERS[2][0])
    assert list(where) == ["host2"]
    assert {m.status for m in site.env.conductor.store.list_migrations()} == {MigrationStatus.CONFIRMED, MigrationStatus.COMPLETED}


def test_reader_sees_no_actions_and_is_refused(site: Site, page: Page) -> None:
    env = site.env
    assert env.ctl is not None
    env.ctl.store.set_service("host1", False, "maintenance window")
    mid = env.conductor.migrate(SERVERS[2][0], "host2", False).id
    env.wait(mid)

    log_in(page, site, READER, READER_PW)
    expect(page.locator(".who .role")).to_have_text("reader")
    expect(page.locator('tr[data-host="host1"] .service .reason')).to_have_text("maintenance window")
    expect(page.locator("#hypervisors button")).to_have_count(0)
    expect(page.locator("#hypervisors th", has_text="Actions")).to_have_count(0)
    shot(page, "reader-hypervisors")
    page.get_by_role("link", name="Migrations").click()
    expect(page.locator(f'#migrations tr[data-migration="{mid}"] .status')).to_contain_text("finished")
    expect(page.locator("#migrations button")).to_have_count(0)
    shot(page, "reader-migrations")

    token = page_token(page)
    for path, form in [("/ui/hypervisors/host1/enable", {}), ("/ui/hypervisors/host2/disable", {"reason": "x"}),
                       ("/ui/hypervisors/host1/drain", {"mode": "live"}), (f"/ui/migrations/{mid}/confirm", {}),
                       (f"/ui/migrations/{mid}/revert", {})]:
        answer = page.request.post(site.url + path, form={"csrf_token": token, **form}, max_redirects=0)
        assert answer.status == 403, (path, answer.status)
        assert "only an admin" in answer.text()
    assert env.ctl.store.get_host("host1").enabled is False  # type: ignore[union-attr]
    assert env.ctl.store.list_drains() == [] and env.conductor.get(mid).status == MigrationStatus.FINISHED


def test_post_without_the_csrf_token_is_refused(site: Site, page: Page) -> None:
    log_in(page, site, ADMIN, ADMIN_PW)
    url = site.url + "/ui/hypervisors/host1/disable"
    forged: list[dict[str, str | float | bool]] = [{"reason": "forged"}, {"reason": "forged", "csrf_token": "guessed"}]
    for form in forged:
        answer = page.request.post(url, form=form, max_redirects=0)
        assert answer.status == 403 and "security token" in answer.text()
    answer = page.request.post(url, form={"reason": "real", "csrf_token": page_token(page)}, max_redirects=0)
    assert answer.status == 303
    page.reload()
    expect(page.locator('tr[data-host="host1"] .service .reason')).to_have_text("real")


def test_no_session_goes_to_the_login_and_back(site: Site, page: Page) -> None:
    answer = page.request.post(site.url + "/ui/hypervisors/host1/disable", form={"reason": "x"}, max_redirects=0)
    assert answer.status == 401
    page.goto(site.url + "/ui/migrations?server=web")
    expect(page).to_have_url(re.compile(r"/ui/login\?next="))
    page.get_by_label("Name").fill(ADMIN)
    page.get_by_label("Password").fill("not the password")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_have_text("wrong name or password")
    expect(page.get_by_label("Name")).to_have_value(ADMIN)   # kept: only the password is typed again
    shot(page, "login-refused")
    page.get_by_label("Password").fill(ADMIN_PW)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(site.url + "/ui/migrations?server=web")
    expect(page.get_by_label("Server")).to_have_value("web")
