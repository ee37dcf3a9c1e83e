"""What the hosts have: hypervisor states and where each server lives, asked of the agents."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, Mapping

from driver.model import Flavor, HostResources

from . import records
from .agents import AgentClient
from .errors import AgentError, Conflict, NotFound
from .records import HostRecord, MigrationRecord
from .scheduler import HostState
from .store import Store

# Where a server is while a migration is open: Nova moves instance.host to the
# destination when the destination's finish step begins.
_ON_DEST = frozenset({records.POST_MIGRATING, records.FINISHED, records.CONFIRMING, records.COMPLETED})

_STATUS = {1: "ACTIVE", 3: "PAUSED", 4: "SHUTOFF", 6: "SHUTOFF", 7: "SUSPENDED", 0: "UNKNOWN"}


@dataclass
class Server:
    """One instance as the controller shows it, wherever it is defined."""

    id: str
    name: str
    host: str
    power_state: int
    state: str
    flavor: dict[str, Any]
    status: str = "UNKNOWN"
    task_state: str | None = None
    migration_id: int | None = None

    @property
    def flavor_obj(self) -> Flavor:
        return Flavor.from_dict(self.flavor)

    def to_api(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Inventory:
    """Asks every configured host's agent, in parallel, what it has."""

    def __init__(self, store: Store, agents: Mapping[str, AgentClient]) -> None:
        self.store = store
        self.agents = agents

    def agent(self, host: str) -> AgentClient:
        try:
            return self.agents[host]
        except KeyError:
            raise NotFound("host", host, hint="; see 'coldferry host list' for the configured hosts") from None

    def host_record(self, host: str) -> HostRecord:
        rec = self.store.get_host(host)
        if rec is None:
            raise NotFound("host", host, hint="; see 'coldferry host list' for the configured hosts")
        return rec

    def host_state(self, rec: HostRecord) -> HostState:
        """One host's service status with its agent's resources (``up`` False if unreachable)."""
        try:
            res = self.agent(rec.name).host()
        except AgentError as e:
            return HostState(rec.name, rec.enabled, rec.disabled_reason, False, None, str(e))
        known = {f.name for f in fields(HostResources)}
        resources = HostResources(**{k: v for k, v in res.items() if k in known})
        return HostState(rec.name, rec.enabled, rec.disabled_reason, True, resources, None)

    def host_states(self) -> list[HostState]:
        hosts = self.store.list_hosts()
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(hosts)))) as pool:
            return list(pool.map(self.host_state, hosts))

    def hypervisor(self, rec: HostRecord, state: HostState | None = None) -> dict[str, Any]:
        """The API's Hypervisor object of one host."""
        st = state or self.host_state(rec)
        r = st.resources
        out: dict[str, Any] = {
            "name": rec.name, "state": "up" if st.up else "down",
            "status": "enabled" if rec.enabled else "disabled", "disabled_reason": rec.disabled_reason,
            "address": rec.address, "agent_url": rec.agent_url, "error": st.error}
        for key in ("instances", "vcpus", "vcpus_used", "memory_mb", "memory_mb_used", "disk_gb", "disk_gb_used"):
            out[key] = getattr(r, key) if r else 0
        for key in ("arch", "hypervisor_type", "hypervisor_version"):
            out[key] = getattr(r, key) if r else None
        return out

    def hypervisors(self) -> list[dict[str, Any]]:
        recs = {r.name: r for r in self.store.list_hosts()}
        return [self.hypervisor(recs[st.name], st) for st in self.host_states()]

    # -- servers ---------------------------------------------------------------

    def _instances(self, host: str) -> list[dict[str, Any]]:
        try:
            return self.agent(host).instances()
        except AgentError:
            return []  # a host that is down shows no servers; `host list` says it is down

    def servers(self, host: str | None = None) -> list[Server]:
        """Every server on every reachable host, once each, on the host it belongs to now."""
        names = [h.name for h in self.store.list_hosts()]
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
            per_host = dict(zip(names, pool.map(self._instances, names)))
        seen: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for h, insts in per_host.items():
            for inst in insts:
                seen.setdefault(inst["uuid"], []).append((h, inst))
        out = []
        for uuid, places in seen.items():
            server = self._server(uuid, places)
            if host is None or server.host == host:
                out.append(server)
        return sorted(out, key=lambda s: (s.name, s.id))

    def _server(self, uuid: str, places: list[tuple[str, dict[str, Any]]]) -> Server:
        mig = self.store.open_migration_for(uuid)
        host, inst = places[0]
        if len(places) > 1:
            wanted = None
            if mig is not None:
                wanted = mig.dest_compute if mig.status in _ON_DEST else mig.source_compute
            running = [p for p in places if p[1].get("power_state") == 1]
            host, inst = next((p for p in places if p[0] == wanted), (running or places)[0])
        server = Server(uuid, inst["name"], host, int(inst.get("power_state", 0)),
                        inst.get("state", ""), inst.get("flavor", {}))
        server.status = _STATUS.get(server.power_state, "UNKNOWN")
        if mig is not None:
            server.migration_id = mig.id
            server.task_state = mig.task_state
            server.status = "VERIFY_RESIZE" if mig.status == records.FINISHED else (
                "MIGRATING" if mig.migration_type == records.LIVE else "RESIZE")
        return server

    def find(self, ref: str) -> Server:
        """A server by uuid or by its unique name; NotFound or Conflict (ambiguous name)."""
        servers = self.servers()
        for s in servers:
            if s.id == ref:
                return s
        named = [s for s in servers if s.name == ref]
        if len(named) > 1:
            raise Conflict(reason=f"{len(named)} servers are named {ref!r}; use the uuid: "
                                  + ", ".join(f"{s.id} on {s.host}" for s in named))
        if not named:
            raise NotFound("server", ref, hint=" on any reachable host; see 'coldferry server list'")
        return named[0]
