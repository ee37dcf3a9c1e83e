"""Many in-memory hosts behind real agent apps, in one process, for ``scripts/bench-fleet``.

    python scripts/benchlib/fleet_hosts.py --hosts 200 --servers 5000 --token T [--migration-seconds 2]

Each host is a MemoryDriver of one MemoryCloud (so that hosts can migrate to
each other) served by its own agent app (``agent.create_app``). One uvicorn
server on a loopback port routes ``/h/<host>/...`` to host ``<host>``'s app,
so a controller's ``agent_url`` for it is ``http://127.0.0.1:<port>/h/<host>``.
Servers ``vm-00001``... are spread round-robin over the hosts, running, with
a small flavor. A disk copy takes ``--migration-seconds`` (the memory driver's
``step_delay`` over its copy steps), standing in for the copy of a real disk.

The port is printed on standard output as ``port <n>`` once the socket is
bound; the process serves until it gets SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import uuid as uuidlib
from pathlib import Path
from typing import Any, Awaitable, Callable

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agent import JobRunner, create_app  # noqa: E402
from driver.memory import MemoryCloud, MemoryDriver  # noqa: E402
from driver.model import Flavor, PowerState  # noqa: E402

#: Every benchmark server's flavor: 1 vCPU, 512 MB, a 1 GB root disk. A default memory host
#: (16 vCPUs, 64 GiB, 1000 GB) takes about 190 of them at the default allocation ratios.
FLAVOR = Flavor("bench.small", 1, 512, 1)
COPY_STEPS = 4
#: The namespace of the servers' uuids: the same names give the same uuids in every process.
_UUIDS = uuidlib.UUID("6c6f6466-6572-7279-2d62-656e63680000")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def host_name(i: int) -> str:
    """The name of host ``i`` (1-based): host001, host002..."""
    return f"host{i:03d}"


def server_name(i: int) -> str:
    """The name of server ``i`` (1-based): vm-00001..."""
    return f"vm-{i:05d}"


def server_uuid(name: str) -> str:
    return str(uuidlib.uuid5(_UUIDS, name))


def placement(hosts: int, servers: int) -> dict[str, list[str]]:
    """Host name -> the names of the servers it starts with (round-robin)."""
    out: dict[str, list[str]] = {host_name(h): [] for h in range(1, hosts + 1)}
    for i in range(servers):
        out[host_name(i % hosts + 1)].append(server_name(i + 1))
    return out


class Router:
    """An ASGI app that hands ``/h/<host>/rest`` to that host's agent app as ``/rest``."""

    def __init__(self, apps: dict[str, Any]) -> None:
        self.apps = apps

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":   # served with lifespan="off": nothing else arrives
            return
        _, prefix, name, *rest = scope["path"].split("/", 3) + [""]
        app = self.apps.get(name) if prefix == "h" else None
        if app is None:
            await _not_found(send, scope["path"])
            return
        path = "/" + (rest[0] if rest else "")
        await app({**scope, "path": path, "raw_path": path.encode(), "root_path": ""}, receive, send)


async def _not_found(send: Send, path: str) -> None:
    body = b'{"detail": "no such host: the path must begin with /h/<host>/"}'
    await send({"type": "http.response.start", "status": 404,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def build(hosts: int, servers: int, token: str, migration_seconds: float) -> Router:
    """The hosts with their servers, each behind its own agent app."""
    cloud = MemoryCloud()
    apps = {}
    for name, names in placement(hosts, servers).items():
        driver = MemoryDriver(name, cloud, step_delay=migration_seconds / COPY_STEPS, copy_steps=COPY_STEPS)
        for vm in names:
            driver.add_instance(server_uuid(vm), vm, FLAVOR, PowerState.RUNNING)
        apps[name] = create_app(driver, token, driver.address, JobRunner())
    return Router(apps)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hosts", type=int, required=True)
    p.add_argument("--servers", type=int, required=True)
    p.add_argument("--token", required=True, help="every agent's bearer token")
    p.add_argument("--migration-seconds", type=float, default=2.0, help="how long one disk copy takes")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    router = build(args.hosts, args.servers, args.token, args.migration_seconds)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(router, log_level="warning", lifespan="off", timeout_keep_alive=75, backlog=2048)
    server = uvicorn.Server(config)
    print(f"port {sock.getsockname()[1]}", flush=True)
    asyncio.run(server.serve(sockets=[sock]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
