"""The dashboard's actions (POST): log in and out, disable and enable a host's service,
drain a host, confirm or revert a migration.

Every action but the login needs a logged-in admin and the session's CSRF
token (auth.action); the login form carries the token of the anonymous
session. Failed logins are throttled per user name and per client address
(throttle.py): a refused attempt answers 429 saying when to try again. An
action the controller refuses comes back to the page it was sent from with
the reason; nothing is half done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from ..errors import BadRequest, ControllerError
from . import csrf, forms
from .auth import Action, Forbidden, action
from .context import Dashboard, local_path
from .forms import posted_form
from .render import flash, redirect

log = logging.getLogger(__name__)

MAX_PARALLEL = 64   # the API's bound on a drain's max_servers


# What an action did, and the dashboard path to show next (None: the page it came from).
Done = tuple[str, str | None]


def _attempt(request: Request, back: str, work: Callable[[], Done]) -> RedirectResponse:
    """Run ``work``; on success go where it says with its message, on a refusal go ``back``
    saying why."""
    try:
        message, target = work()
    except ControllerError as e:
        flash(request.session, "error", str(e))
        return redirect(request, back)
    flash(request.session, "ok", message)
    return redirect(request, target or back)


def router(d: Dashboard) -> APIRouter:
    acts = APIRouter()
    admin = action(d.users)
    anyone = action(d.users, admin_only=False)

    @acts.post("/login", response_model=None)
    def login(request: Request, form: dict[str, str] = Depends(posted_form)) -> HTMLResponse | RedirectResponse:
        if not csrf.valid(request.session, form):
            raise Forbidden("the login form's security token is missing or out of date: reload the page")
        target = local_path(form.get("next"), "/hypervisors")
        name = form.get("name", "").strip()
        client = request.client.host if request.client else "?"
        keys = (("name", name), ("address", client))
        wait = d.throttle.wait(*keys)
        if wait:
            log.warning("dashboard: login as %r from %s refused for %d s: too many failures", name, client, wait)
            refused = d.renderer.page(request, "login.html", None, status=429, next=target, name=name,
                                      error=f"too many failed logins for this name or from this address: "
                                            f"try again in {wait} seconds", no_users=not d.users)
            refused.headers["Retry-After"] = str(wait)
            return refused
        user = d.users.authenticate(name, form.get("password", ""))
        if user is None:
            d.throttle.failed(*keys)
            log.warning("dashboard: failed login as %r from %s", name, client)
            return d.renderer.page(request, "login.html", None, status=401, next=target, name=name,
                                   error="wrong name or password", no_users=not d.users)
        d.throttle.succeeded(keys[0])
        d.users.log_in(request.session, user)
        log.info("dashboard: %s (%s) logged in from %s", user.name, user.role, client)
        return redirect(request, target)

    @acts.post("/logout")
    def logout(request: Request, act: Action = Depends(anyone)) -> RedirectResponse:
        d.users.log_out(request.session)
        return redirect(request, "/login")

    @acts.post("/hypervisors/{host}/disable")
    def disable(request: Request, host: str, act: Action = Depends(admin)) -> RedirectResponse:
        def work() -> Done:
            reason = forms.text(act.form, "reason")
            if reason is None:
                raise BadRequest(reason=f"say why {host}'s service is disabled: the reason is shown to "
                                        f"everyone who looks at the host")
            d.store.set_service(host, False, reason[:255])
            log.info("dashboard: %s disabled the service of %s: %s", act.user.name, host, reason)
            return f"{host}: service disabled", None
        return _attempt(request, "/hypervisors", work)

    @acts.post("/hypervisors/{host}/enable")
    def enable(request: Request, host: str, act: Action = Depends(admin)) -> RedirectResponse:
        def work() -> Done:
            d.store.set_service(host, True, None)
            log.info("dashboard: %s enabled the service of %s", act.user.name, host)
            return f"{host}: service enabled", None
        return _attempt(request, "/hypervisors", work)

    @acts.post("/hypervisors/{host}/drain")
    def drain(request: Request, host: str, act: Action = Depends(admin)) -> RedirectResponse:
        def work() -> Done:
            f = act.form
            live = f.get("mode", "live") == "live"
            started = d.drainer.start(host, live=live,
                                      max_servers=forms.integer(f, "max_servers", 1, 1, MAX_PARALLEL),
                                      dry_run=forms.checkbox(f, "dry_run"),
                                      target_host=forms.text(f, "target_host"), force=forms.checkbox(f, "force"))
            log.info("dashboard: %s started drain %d of %s (live %s, max %d, dry run %s, target %s, force %s)",
                     act.user.name, started.id, host, started.live, started.max_servers, started.dry_run,
                     started.target_host, started.force)
            what = "planned (dry run)" if started.dry_run else "started"
            return f"{host}: drain #{started.id} {what}", f"/drains/{started.id}"
        return _attempt(request, "/hypervisors", work)

    def finish(request: Request, migration_id: int, act: Action, verb: str,
               call: Callable[[int], object]) -> RedirectResponse:
        def work() -> Done:
            call(migration_id)
            log.info("dashboard: %s asked to %s migration %d", act.user.name, verb, migration_id)
            return f"migration {migration_id}: {verb} started", None
        back = local_path(act.form.get("next"), "/migrations")
        return _attempt(request, back, work)

    @acts.post("/migrations/{migration_id}/confirm")
    def confirm(request: Request, migration_id: int, act: Action = Depends(admin)) -> RedirectResponse:
        return finish(request, migration_id, act, "confirm", d.conductor.confirm)

    @acts.post("/migrations/{migration_id}/revert")
    def revert(request: Request, migration_id: int, act: Action = Depends(admin)) -> RedirectResponse:
        return finish(request, migration_id, act, "revert", d.conductor.revert)

    return acts
