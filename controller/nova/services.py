"""``/os-services``: one ``nova-compute`` service per configured host, with a stable UUID.

Disabling or enabling a service is the controller's ``PUT /v1/os-services/{host}``:
the scheduler then skips the host. From 2.53 a service is addressed by its UUID;
before, by host and binary (``PUT /os-services/disable`` and its siblings), as in Nova.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Depends

from ..errors import BadRequest
from ..inventory import Inventory
from ..records import HostRecord
from ..scheduler import HostState
from ..store import Store
from .bodies import LegacyServiceUpdate, ServiceUpdate, parse
from .errors import NovaError
from .versions import Version, current, v

BINARY = "nova-compute"
# The namespace of the UUIDs of services and hypervisors: the same host always has the same ones.
NAMESPACE = uuid.UUID("6f0b8c36-6a55-4a3e-9d1c-2f4b1c0f7e21")
_LEGACY_ACTIONS = ("enable", "disable", "disable-log-reason")


def service_id(host: str) -> str:
    """The UUID of ``host``'s compute service, the same on every controller and after restarts."""
    return str(uuid.uuid5(NAMESPACE, f"service:{host}"))


def router(inventory: Inventory, store: Store) -> APIRouter:
    """The ``/os-services`` routes over the store's hosts."""
    api = APIRouter()

    @api.get("/os-services")
    def list_services(version: Version = Depends(current), host: str | None = None,
                      binary: str | None = None) -> dict[str, Any]:
        if binary not in (None, BINARY):
            return {"services": []}
        recs = {r.name: r for r in store.list_hosts()}
        return {"services": [view(recs[st.name], st, version) for st in inventory.host_states()
                             if host in (None, st.name)]}

    @api.put("/os-services/{ref}")
    def update(ref: str, body: dict[str, Any], version: Version = Depends(current)) -> dict[str, Any]:
        if version < v("2.53"):
            return legacy(ref, body)
        rec = by_id(ref)
        args = parse(ServiceUpdate, body)
        if args.status is None and args.forced_down is None:
            raise BadRequest(reason="At least one of 'status' or 'forced_down' must be specified")
        if args.forced_down:
            raise BadRequest(reason="coldferry cannot force a service down; disable it instead")
        if args.status is not None:
            if args.status == "enabled" and args.disabled_reason:
                raise BadRequest(reason="Specifying a disabled reason is not supported when the status is enabled.")
            enabled = args.status == "enabled"
            rec = store.set_service(rec.name, enabled, None if enabled else args.disabled_reason)
        return {"service": view(rec, inventory.host_state(rec), version)}

    def legacy(action: str, body: dict[str, Any]) -> dict[str, Any]:
        if action not in _LEGACY_ACTIONS:
            raise NovaError(status=404, reason=f"Unknown action {action!r}; one of {', '.join(_LEGACY_ACTIONS)}")
        args = parse(LegacyServiceUpdate, body)
        if args.binary != BINARY:
            raise BadRequest(reason=f"Unknown binary {args.binary!r}; coldferry's hosts run {BINARY} only")
        rec = store.get_host(args.host)
        if rec is None:
            raise NovaError(status=404, reason=f"Host {args.host} could not be found.")
        enabled = action == "enable"
        reason = args.disabled_reason if action == "disable-log-reason" else None
        if action == "disable-log-reason" and not reason:
            raise BadRequest(reason="Missing disabled reason field")
        store.set_service(rec.name, enabled, reason)
        out = {"host": rec.name, "binary": BINARY, "status": "enabled" if enabled else "disabled"}
        return {"service": out | ({"disabled_reason": reason} if reason else {})}

    def by_id(ref: str) -> HostRecord:
        for rec in store.list_hosts():
            if service_id(rec.name) == ref:
                return rec
        raise NovaError(status=404, reason=f"Service {ref} could not be found.")

    return api


def view(rec: HostRecord, st: HostState, version: Version) -> dict[str, Any]:
    """One host's compute service as Nova shows it at ``version``."""
    out: dict[str, Any] = {"id": service_id(rec.name), "binary": BINARY, "host": rec.name, "zone": "nova",
                           "status": "enabled" if rec.enabled else "disabled", "state": "up" if st.up else "down",
                           "updated_at": None, "disabled_reason": rec.disabled_reason}
    if version >= v("2.11"):
        out["forced_down"] = False
    return out

