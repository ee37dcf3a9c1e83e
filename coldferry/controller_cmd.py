"""``coldferry controller``: the controller's HTTP API, its store and its timers."""

from __future__ import annotations

import argparse
import logging
import sys

HELP = """\
Run the coldferry controller: the HTTP API that operators, the CLI
('coldferry server ...', 'coldferry host ...') and the dashboard talk to.
It keeps migration records in its database, checks target hosts against the
scheduler's rules, drives each migration through the source and destination
hosts' agents, drains hosts for maintenance, and on start picks up any
migration a restart interrupted (finishing it, or rolling it back to the
source).

configuration (TOML):
  [controller]
  token_file = "/etc/coldferry/controller.token"   # or token = "..."; clients send it as a Bearer token
  listen = "127.0.0.1"                            # default 127.0.0.1
  port = 8798                                     # default 8798
  database = "sqlite:////var/lib/coldferry/controller.db"   # or postgresql://user@db/coldferry
  auto_confirm_seconds = 0                        # confirm finished migrations after N s; 0 = never
  cpu_allocation_ratio = 16.0                     # ram 1.5, disk 1.0 by default
  session_secret_file = "/etc/coldferry/session.secret"   # signs dashboard logins; without it a
                                                  # random one per start (a restart logs everyone out)
  session_max_age = 43200                         # seconds a dashboard login lasts
  tls_cert = "/etc/coldferry/tls/controller.pem"  # the API's and dashboard's certificate and key
  tls_key = "/etc/coldferry/tls/controller-key.pem"   # (both, or plain_http = true: tokens in the clear)
  agent_ca = "/etc/coldferry/tls/ca.pem"          # checks the agents' certificates; default: the
                                                  # system's trust store
  agent_client_cert = "/etc/coldferry/tls/controller-client.pem"   # optional: shown to agents
  agent_client_key = "/etc/coldferry/tls/controller-client-key.pem" # that set tls_client_ca

  [[hosts]]                                       # one per compute host running 'coldferry agent'
  name = "host1"
  agent_url = "https://198.18.0.11:8797"          # http:// only with plain_http = true
  address = "198.18.0.11"                         # where other hosts reach it over SSH for disk copies
  agent_token_file = "/etc/coldferry/host1.token" # or agent_token = "..."
                                                  # (relative token files: next to this file)

  [[users]]                                       # dashboard logins at https://CONTROLLER:8798/ui/
  name = "alice"
  password_hash = "scrypt$..."                    # from: python -m controller.web.password_hash
  role = "admin"                                  # or "reader": sees every page, changes nothing

Relative file paths are relative to this file's directory. Without tls_cert
and tls_key the controller refuses to start unless plain_http = true; with
plain_http it serves plain HTTP (and may reach agents at http:// URLs) and
warns that the tokens cross the network in the clear. 'coldferry tls --help'
shows how to make a CA and the certificates.

How long a guest gets to shut down cleanly is each host's setting:
shutdown_timeout and shutdown_retry_interval in the [driver] table of its
agent's configuration ('coldferry agent --help'); the controller refuses them.

example:
  coldferry controller --config /etc/coldferry/controller.toml
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("controller", help="run the controller (HTTP API, migration records, scheduler, drains)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE", help="TOML file with [controller], [[hosts]] and optional [[users]]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from agent.config import KEEP_ALIVE_SECONDS
    from controller.config import ControllerConfig
    from controller.errors import ControllerError
    from controller.service import build

    log = logging.getLogger("coldferry.controller")
    if not logging.getLogger().isEnabledFor(logging.INFO):
        logging.getLogger().setLevel(logging.INFO)
    try:
        config = ControllerConfig.load(args.config)
        tls = config.serving_tls(args.config)
        ctl = build(config)
    except ControllerError as e:
        print(f"coldferry controller: error: {e}", file=sys.stderr)
        return 1
    ctl.start()
    log.info("controller listening on %s://%s:%d with %d host(s): %s", "https" if tls else "http", config.listen,
             config.port, len(config.hosts), ", ".join(h.name for h in config.hosts) or "none")
    try:
        uvicorn.run(ctl.app, host=config.listen, port=config.port, log_level="warning",
                    timeout_keep_alive=KEEP_ALIVE_SECONDS, **(tls.uvicorn_options() if tls else {}))
    finally:
        ctl.stop()
    return 0
