"""The dashboard's pages (GET): hypervisors, drains and their results, migrations, login."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from ..config import UserConfig
from ..records import IN_FLIGHT, DrainRecord, MigrationStatus, MigrationType
from .auth import viewer
from .context import Dashboard, local_path
from .render import redirect

# The migrations page shows this many, newest first; filters narrow it down.
MIGRATIONS_SHOWN = 200
_STATUSES = tuple(MigrationStatus)
_TYPES = tuple(MigrationType)


def router(d: Dashboard) -> APIRouter:
    pages = APIRouter()
    who = viewer(d.users)

    @pages.get("/")
    def home(request: Request) -> RedirectResponse:
        return redirect(request, "/hypervisors")

    @pages.get("/login", response_model=None)
    def login(request: Request, next: str | None = None) -> HTMLResponse | RedirectResponse:
        target = local_path(next, "/hypervisors")
        if d.users.current(request.session) is not None:
            return redirect(request, target)
        return d.renderer.page(request, "login.html", None, next=target, name="", error=None,
                               no_users=not d.users)

    @pages.get("/hypervisors")
    def hypervisors(request: Request, user: UserConfig = Depends(who)) -> HTMLResponse:
        hosts = d.inventory.hypervisors()
        last: dict[str, DrainRecord] = {}
        for drain in d.store.list_drains():  # newest first: the first seen per host is its last
            last.setdefault(drain.host, drain)
        return d.renderer.page(request, "hypervisors.html", user, page="hypervisors", hosts=hosts,
                               last_drain=last, names=[h["name"] for h in hosts])

    @pages.get("/drains")
    def drains(request: Request, user: UserConfig = Depends(who)) -> HTMLResponse:
        return d.renderer.page(request, "drains.html", user, page="drains",
                               drains=[d.drainer.to_api(x) for x in d.store.list_drains()])

    @pages.get("/drains/{drain_id}")
    def drain(request: Request, drain_id: int, user: UserConfig = Depends(who)) -> HTMLResponse:
        return d.renderer.page(request, "drain.html", user, page="drains",
                               drain=d.drainer.to_api(d.drainer.get(drain_id)), poll_ms=d.poll_ms)

    @pages.get("/api/drains/{drain_id}")
    def drain_status(drain_id: int, user: UserConfig = Depends(who)) -> dict[str, Any]:
        """The results page polls this for its rows and totals."""
        return d.drainer.to_api(d.drainer.get(drain_id))

    @pages.get("/migrations")
    def migrations(request: Request, host: str = "", status: str = "", server: str = "",
                   migration_type: str = "", user: UserConfig = Depends(who)) -> HTMLResponse:
        # A filter value the list cannot hold is shown as "any" rather than refused.
        status = status if status in _STATUSES else ""
        migration_type = migration_type if migration_type in _TYPES else ""
        found = d.store.list_migrations(host=host.strip() or None,
                                        status=MigrationStatus(status) if status else None,
                                        server=server.strip() or None,
                                        migration_type=MigrationType(migration_type) if migration_type else None)
        here = "/migrations" + ("?" + request.url.query if request.url.query else "")
        return d.renderer.page(
            request, "migrations.html", user, page="migrations",
            migrations=[m.to_api() for m in found[:MIGRATIONS_SHOWN]], more=max(0, len(found) - MIGRATIONS_SHOWN),
            filters={"host": host.strip(), "status": status, "server": server.strip(),
                     "migration_type": migration_type},
            hosts=[h.name for h in d.store.list_hosts()], statuses=_STATUSES, types=_TYPES,
            busy=any(m.status in IN_FLIGHT for m in found[:MIGRATIONS_SHOWN]), here=here)

    return pages
