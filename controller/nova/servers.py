"""``/servers``: servers as Nova shows them, and the migration actions on them.

A server's Nova fields come from the inventory (where it is, its power state,
its open migration) and from its newest migration record; the actions go to
the conductor as ``/v1``'s do. A server whose newest migration ended in
``error``, or waits in ``needs-recovery``, shows ``ERROR`` with that migration's
error as its ``fault``, until its next migration: Nova's pollers (``openstack
server migrate --wait``, Watcher) stop on ERROR and would otherwise poll until
they time out.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from fastapi import APIRouter, Depends, Request, Response, status

from driver.model import Flavor, PowerState

from ..conductor import Conductor
from ..errors import BadRequest
from ..inventory import Server
from ..records import MigrationRecord, MigrationStatus, isotime
from .bodies import LiveArgs, MigrateArgs, parse
from .errors import NovaError
from .versions import Version, current, url, v

_FAILED = frozenset({MigrationStatus.ERROR, MigrationStatus.NEEDS_RECOVERY})
_VM_STATES = {PowerState.RUNNING: "active", PowerState.PAUSED: "paused", PowerState.SUSPENDED: "suspended"}


def router(conductor: Conductor) -> APIRouter:
    """The ``/servers`` routes over ``conductor`` and its inventory and store."""
    api = APIRouter()
    inv, store = conductor.inventory, conductor.store

    def newest(server_id: str) -> MigrationRecord | None:
        found = store.list_migrations(server=server_id)
        return found[0] if found else None

    @api.get("/servers")
    def list_servers(request: Request, name: str | None = None, host: str | None = None) -> dict[str, Any]:
        return {"servers": [{"id": s.id, "name": s.name, "links": _links(request, s.id)}
                            for s in _matching(inv.servers(host=host), name)]}

    @api.get("/servers/detail")
    def list_details(request: Request, version: Version = Depends(current), name: str | None = None,
                     host: str | None = None) -> dict[str, Any]:
        newest_by_server: dict[str, MigrationRecord] = {}
        for m in store.list_migrations():
            newest_by_server.setdefault(m.server, m)
        return {"servers": [view(request, s, newest_by_server.get(s.id), version)
                            for s in _matching(inv.servers(host=host), name)]}

    @api.get("/servers/{server_id}")
    def show(request: Request, server_id: str, version: Version = Depends(current)) -> dict[str, Any]:
        server = find(server_id)
        return {"server": view(request, server, newest(server.id), version)}

    @api.post("/servers/{server_id}/action", status_code=status.HTTP_202_ACCEPTED)
    def action(server_id: str, body: dict[str, Any], version: Version = Depends(current)) -> Response:
        if len(body) != 1:
            raise BadRequest(reason="the body must name exactly one action")
        [(name, args)] = body.items()
        server = find(server_id)
        if name == "migrate":
            migrate = parse(MigrateArgs, args or {}, name)
            if migrate.host is not None and version < v("2.56"):
                raise BadRequest(reason="Invalid input for field/attribute migrate. Additional properties are "
                                        "not allowed ('host' was unexpected); a host needs microversion 2.56")
            conductor.migrate(server.id, migrate.host)
        elif name == "os-migrateLive":
            live = parse(LiveArgs, args, name)
            conductor.migrate(server.id, live.host, live.force, live=True)
        elif name in ("confirmResize", "revertResize"):
            if args is not None:
                raise BadRequest(reason=f"Invalid input for field/attribute {name}: it takes null")
            m = conductor.open_migration(server.id)
            if name == "confirmResize":
                conductor.confirm(m.id)
                return Response(status_code=status.HTTP_204_NO_CONTENT)
            conductor.revert(m.id)
        else:
            raise BadRequest(reason=f"There is no such action: {name} (coldferry serves migrate, "
                                    "os-migrateLive, confirmResize and revertResize)")
        return Response(status_code=status.HTTP_202_ACCEPTED)

    def find(server_id: str) -> Server:
        for s in inv.servers():
            if s.id == server_id:
                return s
        raise NovaError(status=404, reason=f"Instance {server_id} could not be found.")

    return api


def view(request: Request, s: Server, newest: MigrationRecord | None, version: Version) -> dict[str, Any]:
    """The server as Nova's ``GET /servers/{id}`` shows it at ``version``."""
    failed = newest is not None and newest.status in _FAILED
    open_m = newest if newest is not None and newest.id == s.migration_id else None
    vm_state = ("error" if failed else "resized" if s.status == "VERIFY_RESIZE"
                else _VM_STATES.get(s.power_state, "stopped"))
    out: dict[str, Any] = {
        "id": s.id, "name": s.name, "status": "ERROR" if failed else s.status,
        "progress": _progress(s, open_m), "links": _links(request, s.id),
        "tenant_id": None, "user_id": None, "metadata": {}, "image": "", "addresses": {},
        "hostId": hashlib.sha224(s.host.encode()).hexdigest(), "accessIPv4": "", "accessIPv6": "",
        "flavor": _flavor(s.flavor_obj, version), "key_name": None, "config_drive": "",
        "created": None, "updated": isotime(newest.updated_at) if newest else None,
        "OS-DCF:diskConfig": "MANUAL", "OS-EXT-AZ:availability_zone": "nova",
        "OS-EXT-SRV-ATTR:host": s.host, "OS-EXT-SRV-ATTR:hypervisor_hostname": s.host,
        "OS-EXT-SRV-ATTR:instance_name": s.name,
        "OS-EXT-STS:task_state": s.task_state, "OS-EXT-STS:vm_state": vm_state,
        "OS-EXT-STS:power_state": int(s.power_state), "os-extended-volumes:volumes_attached": [],
        "locked": False, "tags": [], "description": None,
    }
    if failed and newest is not None:
        out["fault"] = {"code": 500, "created": isotime(newest.updated_at),
                        "message": f"migration {newest.id} {newest.status}: {newest.error}"}
    return out


def _progress(s: Server, m: MigrationRecord | None) -> int:
    if s.status == "VERIFY_RESIZE":
        return 100
    if m is not None and m.progress:
        return int(100 * float(m.progress["fraction"]))
    return 0


def _flavor(f: Flavor, version: Version) -> dict[str, Any]:
    """The flavor embedded from 2.47 on, a reference by name before."""
    if version < v("2.47"):
        return {"id": f.name, "links": []}
    return {"original_name": f.name, "vcpus": f.vcpus, "ram": f.memory_mb, "disk": f.root_gb,
            "ephemeral": f.ephemeral_gb, "swap": 0, "extra_specs": {}}


def _links(request: Request, server_id: str) -> list[dict[str, str]]:
    href = url(request, f"servers/{server_id}")
    return [{"rel": "self", "href": href}, {"rel": "bookmark", "href": href}]


def _matching(servers: list[Server], name: str | None) -> list[Server]:
    """Nova's ``name`` filter: a regular expression searched in the name (literally when it is not one)."""
    if not name:
        return servers
    try:
        pattern = re.compile(name)
    except re.error:
        pattern = re.compile(re.escape(name))
    return [s for s in servers if pattern.search(s.name)]

