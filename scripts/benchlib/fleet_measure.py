"""What ``bench-fleet`` times: list latencies (API and CLI), one migration alone, concurrent drains."""

from __future__ import annotations

import math
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from . import fleet_hosts
from .fleet_procs import COLDFERRY, REPO, Controller, Fleet, FleetError

#: Where a migration's copy is over, one way or the other.
_SETTLED = frozenset({"finished", "error", "needs-recovery", "confirmed", "reverted"})


@dataclass(frozen=True)
class Query:
    """One list the operator asks for: its name, its API path and the same through the CLI."""

    name: str
    api: str
    cli: tuple[str, ...]


def queries(fleet: Fleet) -> list[Query]:
    """The lists timed, with filters on a host that has records both ways and on a seeded server."""
    host = fleet_hosts.host_name(2)
    server = fleet_hosts.server_name(2)
    return [
        Query("host list", "/v1/os-hypervisors", ("host", "list")),
        Query("server list", "/v1/servers", ("server", "list")),
        Query("server list --host", f"/v1/servers?host={host}", ("server", "list", "--host", host)),
        Query("migration list", "/v1/os-migrations", ("server", "migration", "list")),
        Query("migration list --host --status", f"/v1/os-migrations?host={host}&status=confirmed",
              ("server", "migration", "list", "--host", host, "--status", "confirmed")),
        Query("migration list --status error", "/v1/os-migrations?status=error",
              ("server", "migration", "list", "--status", "error")),
        Query("migration list --server", f"/v1/os-migrations?server={server}",
              ("server", "migration", "list", "--server", server)),
    ]


def percentile(values: list[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile: with fewer than 100 samples p99 is the largest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def summarize(seconds: list[float]) -> dict[str, Any]:
    return {"n": len(seconds), "p50_s": percentile(seconds, 50), "p99_s": percentile(seconds, 99),
            "samples_s": [round(s, 4) for s in seconds]}


def _items(body: Any) -> int:
    """How many rows a list answer holds."""
    return len(next(iter(body.values()))) if isinstance(body, dict) and body else 0


def time_api(fleet: Fleet, q: Query, samples: int) -> dict[str, Any]:
    """``samples`` GETs of ``q`` after one warm-up, taking the controllers in turn; each must answer 200."""
    clients = [fleet.client(c) for c in fleet.controllers]
    try:
        seconds, rows = [], 0
        for i in range(samples + 1):
            http = clients[i % len(clients)]
            start = time.perf_counter()
            answer = http.get(q.api)
            took = time.perf_counter() - start
            if answer.status_code != 200:
                raise FleetError(f"GET {q.api} answered {answer.status_code}: {answer.text[:300]}")
            rows = _items(answer.json())
            if i:
                seconds.append(took)
        return {**summarize(seconds), "rows": rows}
    finally:
        for http in clients:
            http.close()


def time_cli(fleet: Fleet, q: Query, samples: int) -> dict[str, Any]:
    """``samples`` runs of ``coldferry <q.cli>`` (table output, to a pipe), the controllers in turn;
    each must exit 0."""
    seconds, lines = [], 0
    for i in range(samples):
        ctl = fleet.controllers[i % len(fleet.controllers)]
        start = time.perf_counter()
        done = subprocess.run([str(COLDFERRY), *q.cli], env=fleet.cli_env(ctl), cwd=REPO, capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=900)
        seconds.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise FleetError(f"coldferry {' '.join(q.cli)} exited {done.returncode}: "
                             f"{done.stderr.decode(errors='replace')[-500:]}")
        lines = done.stdout.count(b"\n")
    return {**summarize(seconds), "lines": lines}


def one_migration(fleet: Fleet, ctl: Controller, server: str, timeout: float = 600.0) -> dict[str, Any]:
    """Migrate ``server`` (the scheduler picks the host) and follow it to the end: request to finished."""
    uuid = fleet_hosts.server_uuid(server)
    with fleet.client(ctl) as http:
        start = time.perf_counter()
        answer = http.post(f"/v1/servers/{uuid}/action", json={"migrate": {}})
        if answer.status_code != 202:
            raise FleetError(f"migrate {server} answered {answer.status_code}: {answer.text[:300]}")
        accepted = time.perf_counter() - start
        mid = answer.json()["migration"]["id"]
        deadline = start + timeout
        while time.perf_counter() < deadline:
            m = http.get(f"/v1/os-migrations/{mid}").json()
            if m["status"] in _SETTLED:
                return {"server": server, "id": mid, "status": m["status"], "accepted_s": accepted,
                        "seconds": time.perf_counter() - start, "error": m.get("error")}
            time.sleep(0.02)
    raise FleetError(f"migration {mid} of {server} not settled after {timeout:g} s")


def drain_run(fleet: Fleet, hosts: list[str], max_servers: int, timeout: float) -> dict[str, Any]:
    """Start a drain of every host of ``hosts`` at once (the controllers in turn) and follow them all
    until done or ``timeout``; the figures of the run."""
    def start(i_host: tuple[int, str]) -> tuple[Controller, dict[str, Any], float]:
        i, host = i_host
        ctl = fleet.controllers[i % len(fleet.controllers)]
        with fleet.client(ctl) as http:
            t = time.perf_counter()
            answer = http.post(f"/v1/os-hypervisors/{host}/drain", json={"max_servers": max_servers})
            took = time.perf_counter() - t
        if answer.status_code != 202:
            raise FleetError(f"drain of {host} on {ctl.name} answered {answer.status_code}: {answer.text[:300]}")
        return ctl, answer.json(), took

    cpu_before = fleet.cpu_seconds()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        started = list(pool.map(start, enumerate(hosts)))
    clients = {c.name: fleet.client(c) for c in fleet.controllers}
    ends: dict[int, float] = {}
    last: dict[int, dict[str, Any]] = {d["id"]: d for _, d, _ in started}
    try:
        while len(ends) < len(started) and time.perf_counter() - t0 < timeout:
            time.sleep(0.5)
            for ctl, d, _ in started:
                if d["id"] in ends:
                    continue
                last[d["id"]] = clients[ctl.name].get(f"/v1/drains/{d['id']}").json()
                if last[d["id"]]["status"] == "done":
                    ends[d["id"]] = time.perf_counter() - t0
    finally:
        for http in clients.values():
            http.close()
    elapsed = max(ends.values()) if len(ends) == len(started) else time.perf_counter() - t0
    rows = [r for d in last.values() for r in d["rows"]]
    per_host = [len(d["rows"]) for d in last.values()]
    cpu_after = fleet.cpu_seconds()
    return {"max_servers": max_servers, "controllers": len(fleet.controllers), "hosts": len(hosts),
            "complete": len(ends) == len(started), "elapsed_s": elapsed, "migrations": len(rows),
            "done": sum(r["status"] == "done" for r in rows), "errors": sum(r["status"] == "error" for r in rows),
            "servers_per_host": max(per_host, default=0),
            "start_s": {"p50_s": percentile([s for _, _, s in started], 50),
                        "max_s": max(s for _, _, s in started)},
            "drain_s": sorted(round(e, 2) for e in ends.values()),
            "drain_errors": sorted({d["error"] for d in last.values() if d.get("error")})[:5],
            "row_errors": sorted({r["error"] for r in rows if r.get("error")})[:5],
            "cpu_s": {k: round(cpu_after.get(k, 0.0) - cpu_before.get(k, 0.0), 1) for k in cpu_after}}
