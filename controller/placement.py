"""Where a server may go: the checks on a migration's target, for one server and for a drain.

The scheduler's rules (scheduler.py) decide whether a host can take a
server; this module adds what the conductor and the drain both need: the
hosts are configured, the target is another host, force comes with a
target, the server is in a state that moves and has no open migration.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from driver.model import MOVABLE_STATES, Flavor, PowerState

from . import scheduler
from .config import ControllerConfig
from .errors import BadRequest, Conflict, NoValidHost
from .inventory import Inventory, Server
from .records import HostRecord, MigrationStatus
from .store import Store

#: Seconds the scheduler reuses the hosts' resources it asked for: a drain's burst of starts asks
#: the fleet once, not once per server; what was started since is counted (``claimed``).
STATES_MAX_AGE = 2.0

#: Open migrations whose server the destination's agent does not count yet (not defined there).
_NOT_ON_DEST_YET = frozenset({MigrationStatus.PRE_MIGRATING, MigrationStatus.MIGRATING})

_UNMOVABLE_WHY = {PowerState.PAUSED: "paused: unpause it or shut it off",
                  PowerState.SUSPENDED: "suspended: resume it or shut it off"}


def unmovable_reason(state: PowerState) -> str | None:
    """Why a server in ``state`` cannot be migrated as it is (None: it can), e.g. ``paused: unpause
    it or shut it off``."""
    if state in MOVABLE_STATES:
        return None
    return _UNMOVABLE_WHY.get(state, f"in power state {state.label}")


class Placement:
    """The checks on where a server goes, against the store's hosts and the inventory's states."""

    def __init__(self, store: Store, inventory: Inventory, config: ControllerConfig) -> None:
        self.store = store
        self.inventory = inventory
        self.config = config

    @property
    def ratios(self) -> scheduler.Ratios:
        c = self.config
        return scheduler.Ratios(c.cpu_allocation_ratio, c.ram_allocation_ratio, c.disk_allocation_ratio)

    def spec(self, server: Server) -> scheduler.RequestSpec:
        src = self.inventory.host_state(self.inventory.host_record(server.host))
        res = src.resources
        return scheduler.RequestSpec(server.id, server.name, server.flavor_obj, server.host,
                                     res.arch if res else "", res.hypervisor_type if res else "")

    def check_destination(self, server_ref: str, target_host: str) -> dict[str, Any]:
        """Whether ``target_host`` passes the scheduler's rules for the server, and which rule fails."""
        server = self.inventory.find(server_ref)
        results = self.rules(server, self.known_host(target_host))
        failed = scheduler.first_failure(results)
        return {"host": target_host, "server": server.id, "passes": failed is None,
                "failed": failed.name if failed else None,
                "rules": [{"name": r.name, "passed": r.passed, "reason": r.reason} for r in results]}

    def check_target(self, source_host: str, target_host: str | None, force: bool) -> HostRecord | None:
        """The checks on where a move goes, for one server and for a drain alike: both hosts are
        configured, the target is another host, and force comes with a target.

        :returns: the target's record; None when no target is given (the scheduler chooses).
        :raises BadRequest: an unknown host, the target being the source, force without a target.
        """
        self.known_host(source_host)
        if not target_host:
            if force:
                raise BadRequest(reason="force needs a target host: give one, or drop force to let the "
                                        "scheduler choose")
            return None
        target = self.known_host(target_host)
        if target.name == source_host:
            raise BadRequest(reason=f"the target host {target_host} is the source host; choose another host")
        return target

    def known_host(self, name: str) -> HostRecord:
        rec = self.store.get_host(name)
        if rec is None:
            known = ", ".join(h.name for h in self.store.list_hosts()) or "none"
            raise BadRequest(reason=f"unknown host {name!r}; configured hosts: {known}")
        return rec

    def rules(self, server: Server, target: HostRecord,
              state: scheduler.HostState | None = None) -> list[scheduler.RuleResult]:
        """The scheduler's rules for ``server`` on ``target`` (its ``state``, asked when not given),
        counting the migrations already on their way there (``claimed``)."""
        state = state or self.inventory.host_state(target)
        return scheduler.check(self.claimed([state])[0], self.spec(server), self.ratios)

    def claimed(self, states: list[scheduler.HostState]) -> list[scheduler.HostState]:
        """``states`` with the flavors of the open migrations headed to each host counted as used:
        until the destination defines the server, its agent does not count it, and a burst of
        migrations (a drain) would otherwise all pick the one host that looked emptiest."""
        heading: dict[str, list[Flavor]] = {}
        for m in self.store.in_flight_migrations():
            if m.status in _NOT_ON_DEST_YET and m.flavor:
                heading.setdefault(m.dest_compute, []).append(Flavor.from_dict(m.flavor))
        out = []
        for st in states:
            flavors = heading.get(st.name)
            if flavors and st.resources is not None:
                r = st.resources
                st = dataclasses.replace(st, resources=dataclasses.replace(
                    r, vcpus_used=r.vcpus_used + sum(f.vcpus for f in flavors),
                    memory_mb_used=r.memory_mb_used + sum(f.memory_mb for f in flavors),
                    disk_gb_used=r.disk_gb_used + sum(f.root_gb + f.ephemeral_gb for f in flavors),
                    instances=r.instances + len(flavors)))
            out.append(st)
        return out

    def check_movable(self, server: Server) -> None:
        why = unmovable_reason(server.power_state)
        if why is not None:
            raise Conflict(reason=f"server {server.name} ({server.id}) cannot be migrated: it is {why} "
                                  "before migrating it")
        open_m = self.store.open_migration_for(server.id)
        if open_m is not None:
            what = ("confirm or revert it first" if open_m.status == MigrationStatus.FINISHED
                    else f"it recovers by itself once both hosts answer, or run 'coldferry server migration "
                         f"recover {open_m.id}'" if open_m.status == MigrationStatus.NEEDS_RECOVERY
                    else "wait until it ends")
            raise Conflict(reason=f"server {server.name} ({server.id}) already has migration {open_m.id} in "
                                  f"status {open_m.status}; {what}")

    def ask(self, server: Server, target_host: str | None, force: bool) -> "Candidates":
        """Check the target and ask the candidate hosts' agents for their resources (the slow part,
        done before the conductor takes its lock); ``Candidates.pick`` then chooses.

        :raises BadRequest: see ``check_target``.
        """
        target = self.check_target(server.host, target_host, force)
        if target is None:
            states = self.inventory.host_states(max_age=STATES_MAX_AGE)
            return Candidates(self, server, None, force, states)
        states = [] if force else [self.inventory.host_state(target)]
        return Candidates(self, server, target, force, states)


@dataclass(frozen=True)
class Candidates:
    """The hosts a server may go to, with their agents' resources as asked (Placement.ask)."""

    placement: Placement
    server: Server
    target: HostRecord | None
    force: bool
    states: list[scheduler.HostState]

    def pick(self) -> HostRecord:
        """Choose, counting the migrations already headed to each host (read now, so the conductor
        calls this and records the migration under one lock). Raises NoValidHost."""
        p, server = self.placement, self.server
        if self.target is None:
            return p.known_host(scheduler.select(p.claimed(self.states), p.spec(server), p.ratios))
        if not self.force:
            failed = scheduler.first_failure(p.rules(server, self.target, self.states[0]))
            if failed:
                raise NoValidHost(server=server.id, reason=f"host {self.target.name} fails rule {failed.name}: "
                                                           f"{failed.reason} (force skips the check)")
        return self.target
