"""``/os-hypervisors``: one hypervisor per configured host, with its agent's figures.

From 2.53 hypervisors have stable UUIDs, are found by ``hypervisor_hostname_pattern``
and list their servers with ``with_servers``; before, by ``/{pattern}/search``
and ``/{pattern}/servers``, as in Nova. The maximum microversion (versions.py)
is below 2.88, so the vcpus, memory and disk figures are always there.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from typing import Any

from fastapi import APIRouter, Depends

from ..inventory import Inventory, Server
from ..records import HostRecord
from ..scheduler import HostState
from ..store import Store
from .errors import NovaError
from .services import NAMESPACE, service_id
from .versions import Version, current, v


def hypervisor_id(host: str) -> str:
    """The UUID of ``host``'s hypervisor (not its service's), stable as ``service_id``."""
    return str(uuid.uuid5(NAMESPACE, f"hypervisor:{host}"))


def router(inventory: Inventory, store: Store) -> APIRouter:
    """The ``/os-hypervisors`` routes over the store's hosts and their agents."""
    api = APIRouter()

    def listed(version: Version, pattern: str | None, with_servers: bool, detail: bool) -> dict[str, Any]:
        recs = {r.name: r for r in store.list_hosts() if pattern is None or pattern in r.name}
        if pattern is not None and not recs:
            raise NovaError(status=404, reason=f"No hypervisor matching {pattern!r} could be found.")
        servers = _by_host(inventory.servers()) if with_servers else None
        states = [st for st in inventory.host_states() if st.name in recs]
        return {"hypervisors": [view(recs[st.name], st, version, detail, servers) for st in states]}

    @api.get("/os-hypervisors")
    def list_hypervisors(version: Version = Depends(current), hypervisor_hostname_pattern: str | None = None,
                         with_servers: bool = False) -> dict[str, Any]:
        return listed(version, hypervisor_hostname_pattern, with_servers and version >= v("2.53"), detail=False)

    @api.get("/os-hypervisors/detail")
    def list_details(version: Version = Depends(current), hypervisor_hostname_pattern: str | None = None,
                     with_servers: bool = False) -> dict[str, Any]:
        return listed(version, hypervisor_hostname_pattern, with_servers and version >= v("2.53"), detail=True)

    @api.get("/os-hypervisors/{pattern}/servers")
    def servers_of(pattern: str, version: Version = Depends(current)) -> dict[str, Any]:
        if version >= v("2.53"):
            raise NovaError(status=404, reason="The resource could not be found.")
        return listed(version, pattern, with_servers=True, detail=False)

    @api.get("/os-hypervisors/{pattern}/search")
    def search(pattern: str, version: Version = Depends(current)) -> dict[str, Any]:
        if version >= v("2.53"):
            raise NovaError(status=404, reason="The resource could not be found.")
        return listed(version, pattern, with_servers=False, detail=False)

    @api.get("/os-hypervisors/{hypervisor}")
    def show(hypervisor: str, version: Version = Depends(current), with_servers: bool = False) -> dict[str, Any]:
        for rec in store.list_hosts():
            if hypervisor_id(rec.name) == hypervisor:
                servers = _by_host(inventory.servers(host=rec.name)) if with_servers else None
                return {"hypervisor": view(rec, inventory.host_state(rec), version, True, servers)}
        raise NovaError(status=404, reason=f"Hypervisor with ID {hypervisor} could not be found.")

    return api


def view(rec: HostRecord, st: HostState, version: Version, detail: bool,
         servers: dict[str, list[Server]] | None) -> dict[str, Any]:
    """One hypervisor as Nova shows it at ``version``: its summary, or with ``detail`` its
    figures and service; ``servers`` (by host) adds the host's servers, when it has any."""
    out: dict[str, Any] = {"id": hypervisor_id(rec.name), "hypervisor_hostname": rec.name,
                           "state": "up" if st.up else "down", "status": "enabled" if rec.enabled else "disabled"}
    if detail:
        r = st.resources
        vcpus, vcpus_used = (r.vcpus, r.vcpus_used) if r else (0, 0)
        ram, ram_used = (r.memory_mb, r.memory_mb_used) if r else (0, 0)
        disk, disk_used = (r.disk_gb, r.disk_gb_used) if r else (0, 0)
        cpu_info = {"arch": r.arch} if r else {}
        out |= {"hypervisor_type": r.hypervisor_type if r else None,
                "hypervisor_version": r.hypervisor_version if r else None, "host_ip": rec.address,
                "service": {"host": rec.name, "id": service_id(rec.name), "disabled_reason": rec.disabled_reason},
                "vcpus": vcpus, "vcpus_used": vcpus_used, "memory_mb": ram, "memory_mb_used": ram_used,
                "local_gb": disk, "local_gb_used": disk_used, "free_ram_mb": ram - ram_used,
                "free_disk_gb": disk - disk_used, "disk_available_least": disk - disk_used,
                "current_workload": 0, "running_vms": r.instances if r else 0,
                "cpu_info": cpu_info if version >= v("2.28") else json.dumps(cpu_info)}
    if servers is not None and servers.get(rec.name):
        out["servers"] = [{"uuid": s.id, "name": s.name} for s in servers[rec.name]]
    return out


def _by_host(servers: list[Server]) -> dict[str, list[Server]]:
    out: dict[str, list[Server]] = defaultdict(list)
    for s in servers:
        out[s.host].append(s)
    return out
