"""What the hosts have: hypervisor states and where each server lives, asked of the agents."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
import uuid as uuidlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from agent.schemas import InstanceOut
from driver.model import Flavor, HostResources, PowerState

from .agents import AgentClient
from .errors import AgentError, Conflict, NotFound
from .records import FINAL, HostRecord, MigrationRecord, MigrationStatus, MigrationType
from .scheduler import HostState
from .store import Store

log = logging.getLogger(__name__)

# Where a server is while a migration is open: Nova moves instance.host to the
# destination when the destination's finish step begins.
ON_DEST = frozenset({MigrationStatus.POST_MIGRATING, MigrationStatus.FINISHED, MigrationStatus.CONFIRMING,
                      MigrationStatus.COMPLETED})

# Nova's server status of each power state.
_STATUS = {PowerState.RUNNING: "ACTIVE", PowerState.PAUSED: "PAUSED", PowerState.SHUTDOWN: "SHUTOFF",
           PowerState.CRASHED: "SHUTOFF", PowerState.SUSPENDED: "SUSPENDED", PowerState.NOSTATE: "UNKNOWN"}
_RESOURCES = frozenset(f.name for f in fields(HostResources))


@dataclass
class Server:
    """One instance as the controller shows it, wherever it is defined."""

    id: str
    name: str
    host: str
    power_state: PowerState
    state: str
    flavor: dict[str, Any]
    status: str = "UNKNOWN"
    task_state: str | None = None
    migration_id: int | None = None

    @property
    def flavor_obj(self) -> Flavor:
        return Flavor.from_dict(self.flavor)

    def to_api(self) -> dict[str, Any]:
        return asdict(self)


def belongs_on(m: MigrationRecord) -> str:
    """The host a server under open migration ``m`` belongs to now: the destination once the
    destination has it (ON_DEST), else the source."""
    return m.dest_compute if m.status in ON_DEST else m.source_compute


class Inventory:
    """Asks every configured host's agent, in parallel, what it has."""

    def __init__(self, store: Store, agents: Mapping[str, AgentClient]) -> None:
        self.store = store
        self.agents = agents
        self._states_lock = threading.Lock()
        self._states: tuple[float, dict[str, HostState]] = (0.0, {})

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
        resources = HostResources(**res.model_dump(include=_RESOURCES))
        return HostState(rec.name, rec.enabled, rec.disabled_reason, True, resources, None)

    def host_states(self, max_age: float = 0.0) -> list[HostState]:
        """Every host's state, asked now; or, with ``max_age``, the states asked at most that many
        seconds ago (the scheduler's: a burst of migration starts asks the fleet once, and counts
        the migrations recorded since, Placement.claimed)."""
        hosts = self.store.list_hosts()   # the service status is always the database's, now
        with self._states_lock:
            asked_at, asked = self._states
        if max_age <= 0 or time.monotonic() - asked_at > max_age or {h.name for h in hosts} - asked.keys():
            asked_at = time.monotonic()
            with ThreadPoolExecutor(max_workers=max(1, min(8, len(hosts)))) as pool:
                asked = {st.name: st for st in pool.map(self.host_state, hosts)}
            with self._states_lock:
                self._states = (asked_at, asked)
        return [dataclasses.replace(asked[h.name], enabled=h.enabled, disabled_reason=h.disabled_reason)
                for h in hosts]

    def hypervisor(self, rec: HostRecord, state: HostState | None = None) -> dict[str, Any]:
        """The API's Hypervisor object of one host."""
        st = state or self.host_state(rec)
        r = st.resources
        return {
            "name": rec.name, "state": "up" if st.up else "down",
            "status": "enabled" if rec.enabled else "disabled", "disabled_reason": rec.disabled_reason,
            "address": rec.address, "agent_url": rec.agent_url, "error": st.error,
            "instances": r.instances if r else 0, "vcpus": r.vcpus if r else 0,
            "vcpus_used": r.vcpus_used if r else 0, "memory_mb": r.memory_mb if r else 0,
            "memory_mb_used": r.memory_mb_used if r else 0, "disk_gb": r.disk_gb if r else 0,
            "disk_gb_used": r.disk_gb_used if r else 0, "arch": r.arch if r else None,
            "hypervisor_type": r.hypervisor_type if r else None,
            "hypervisor_version": r.hypervisor_version if r else None}

    def hypervisors(self) -> list[dict[str, Any]]:
        recs = {r.name: r for r in self.store.list_hosts()}
        return [self.hypervisor(recs[st.name], st) for st in self.host_states()]

    # -- servers ---------------------------------------------------------------

    def _instances(self, host: str) -> list[InstanceOut] | AgentError:
        try:
            return self.agent(host).instances()
        except AgentError as e:
            return e

    def servers(self, host: str | None = None) -> list[Server]:
        """Every server on every reachable host, once each, on the host it belongs to now;
        with ``host``, those on that host only.

        A host whose agent does not answer shows no servers (`host list` says it is down),
        except ``host`` itself: its servers are asked for, so Conflict when it does not answer.
        """
        if host is not None:
            return self._servers_on(host)
        names = [h.name for h in self.store.list_hosts()]
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
            per_host = dict(zip(names, pool.map(self._instances, names)))
        seen: dict[str, list[tuple[str, InstanceOut]]] = {}
        for h, insts in per_host.items():
            if isinstance(insts, AgentError):
                if h == host:
                    raise Conflict(reason=f"cannot list the servers of host {h}: {insts}")
                log.warning("host %s shows no servers: %s", h, insts)
                continue
            for inst in insts:
                seen.setdefault(inst.uuid, []).append((h, inst))
        # One query for every server's open migration: one query per server made a fleet's list
        # cost a database round trip per server.
        open_migrations = self._open_migrations()
        out = []
        for uuid, places in seen.items():
            server = self._server(uuid, places, open_migrations.get(uuid))
            if host is None or server.host == host:
                out.append(server)
        return sorted(out, key=lambda s: (s.name, s.id))

    def _servers_on(self, host: str) -> list[Server]:
        """``servers(host=host)`` without listing the fleet: ``host``'s instances, less those an open
        migration has moved to another host that defines them (that host alone is asked)."""
        insts = self._instances(host)
        if isinstance(insts, AgentError):
            raise Conflict(reason=f"cannot list the servers of host {host}: {insts}")
        open_migrations = self._open_migrations()
        out = []
        for inst in insts:
            server = self._placed(host, inst, open_migrations.get(inst.uuid))
            if server.host == host:
                out.append(server)
        return sorted(out, key=lambda s: (s.name, s.id))

    def _placed(self, host: str, inst: InstanceOut, mig: MigrationRecord | None) -> Server:
        """The server ``inst`` that ``host`` defines, placed as ``servers()`` places it: when its open
        migration ``mig`` says it belongs on another host, that host alone is asked whether it has it."""
        places = [(host, inst)]
        other = None if mig is None else belongs_on(mig)
        if other is not None and other != host:
            elsewhere = self._instance(other, inst.uuid)
            if elsewhere is not None:
                places.append((other, elsewhere))
        return self._server(inst.uuid, places, mig)

    def _open_migrations(self) -> dict[str, MigrationRecord]:
        """Each server's newest migration not yet final, by server uuid (as ``Store.open_migration_for``)."""
        found: dict[str, MigrationRecord] = {}
        for status in sorted(set(MigrationStatus) - FINAL):
            for m in self.store.migrations_in(status):
                newest = found.get(m.server)
                if newest is None or (m.created_at, m.id) > (newest.created_at, newest.id):
                    found[m.server] = m
        return found

    def _server(self, uuid: str, places: list[tuple[str, InstanceOut]],
                mig: MigrationRecord | None) -> Server:
        host, inst = places[0]
        if len(places) > 1:
            wanted = None if mig is None else belongs_on(mig)
            running = [p for p in places if p[1].power_state == PowerState.RUNNING]
            host, inst = next((p for p in places if p[0] == wanted), (running or places)[0])
        # The agent client refused power states PowerState does not know.
        power_state = PowerState(inst.power_state)
        server = Server(uuid, inst.name, host, power_state, inst.state, inst.flavor.model_dump(),
                        status=_STATUS[power_state])
        if mig is not None:
            server.migration_id = mig.id
            server.task_state = mig.task_state
            server.status = "VERIFY_RESIZE" if mig.status == MigrationStatus.FINISHED else (
                "MIGRATING" if mig.migration_type == MigrationType.LIVE else "RESIZE")
        return server

    def find(self, ref: str, on: str | None = None) -> Server:
        """A server by uuid or by its unique name; NotFound or Conflict (ambiguous name).

        :param on: the host the caller knows defines the server (a drain's host): asked first, alone.
        """
        if on is not None:
            with contextlib.suppress(Conflict):   # not answering: the other hosts are asked below
                found = self.server_on(on, ref)
                if found is not None:
                    return found
        by_uuid = self._by_uuid(ref)
        if by_uuid is not None:
            return by_uuid
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

    def server_on(self, host: str, uuid: str) -> Server | None:
        """The server ``uuid`` if it is on ``host`` now (defined there, and placed there as
        ``servers()`` places it), else None; only ``host`` (and the other host of an open
        migration) is asked. Raises Conflict when ``host`` does not answer."""
        try:
            inst = self.agent(host).instance(uuid)
        except AgentError as e:
            raise Conflict(reason=f"cannot tell whether {uuid} is still on {host}: {e}") from e
        if inst is None:
            return None
        server = self._placed(host, inst, self.store.open_migration_for(uuid))
        return server if server.host == host else None

    def _by_uuid(self, ref: str) -> Server | None:
        """The server whose uuid is ``ref``, as ``servers()`` would place it, or None when no reachable
        host defines it. Asks every host for that one instance: the answers are the size of the
        hosts, not of every server on them, so a migration's start does not grow with the fleet."""
        try:
            uuidlib.UUID(ref)
        except ValueError:
            return None
        names = [h.name for h in self.store.list_hosts()]
        with ThreadPoolExecutor(max_workers=max(1, min(8, len(names)))) as pool:
            found = list(pool.map(lambda h: self._instance(h, ref), names))
        places = [(h, inst) for h, inst in zip(names, found) if inst is not None]
        if not places:
            return None
        return self._server(ref, places, self.store.open_migration_for(ref))

    def _instance(self, host: str, uuid: str) -> InstanceOut | None:
        """``uuid`` as ``host`` defines it; None when it does not, or does not answer (as ``servers()``
        skips a host that does not answer)."""
        try:
            return self.agent(host).instance(uuid)
        except AgentError as e:
            log.warning("host %s shows no servers: %s", host, e)
            return None
