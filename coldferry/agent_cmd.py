"""``coldferry agent``: run this host's agent daemon (the driver behind an HTTP API)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # FastAPI, uvicorn and libvirt load only when the agent runs
    from agent.config import AgentConfig
    from driver.base import ComputeDriver

log = logging.getLogger(__name__)

HELP = """\
Run the coldferry agent of this host: a daemon that serves this host's
hypervisor driver over an authenticated HTTP API (docs/api.md, section
Agent). The controller asks it for the host's resources and instances, and
starts migration steps on it (migrate-disk-and-power-off on the source,
finish-migration on the destination, confirm, revert, live-migrate); long
steps run as background jobs the controller polls for state and progress.
Every request must carry "Authorization: Bearer TOKEN", over TLS: the token
would otherwise cross the network in the clear.

configuration ([agent] table of the TOML file):
  listen       address to bind (default "0.0.0.0")
  port         TCP port (default 8797)
  token        the bearer token requests must present, or
  token_file   a file holding it (one of the two is required; a relative
               path is relative to the configuration file's directory)
  address      this host's address other hosts use to reach it over SSH
               when copying disks here (default: the host name)
  driver       "libvirt" (default), "memory" (an in-memory host for demos) or
               "xenserver" (XenServer's VHD-chain migration over a STUBBED
               session: VHD files in an SR directory, no XenServer is contacted)
  tls_cert     this host's certificate (PEM), with its SAN naming the address
  tls_key      in the controller's agent_url, and its unencrypted key; both are
               required unless plain_http = true ('coldferry tls --help' makes
               them; relative paths: next to the configuration file)
  tls_client_ca  a CA certificate: then clients (the controller) must present
               a certificate it signed (agent_client_cert in [controller])
  plain_http   true serves plain HTTP instead, with a warning: the tokens
               cross the network in the clear (default false)
The [driver] table configures the libvirt driver (see driver/libvirt/config.py;
'coldferry driver --help' shows how to call it by hand); its SSH and transfer
settings also serve the xenserver driver's copies. Its shutdown_timeout and
shutdown_retry_interval (default 60 and 10 seconds) bound a clean guest
shutdown when a request names none: they are the host's, not the controller's.
A setting the agent cannot use stops it with one line naming the setting.
[xenserver] table (driver = "xenserver" only):
  sr_path            the SR directory, the same path on every host (required)
  state_path         the stub's record file (default <sr_path>/.xapi-stub.json)
  coalesce_timeout   seconds to wait for the SR to merge a leaf back (default 60)

example /etc/coldferry/agent.toml:
  [agent]
  listen = "0.0.0.0"
  port = 8797
  token_file = "/etc/coldferry/agent.token"
  address = "198.18.0.11"
  tls_cert = "/etc/coldferry/tls/host1.pem"
  tls_key = "/etc/coldferry/tls/host1-key.pem"
  tls_client_ca = "/etc/coldferry/tls/ca.pem"

  [driver]
  instances_path = "/var/lib/coldferry/instances"
  host_name = "host1"
  transfer_method = "stream"
  shutdown_timeout = 60
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``agent`` command to the ``coldferry`` command line."""
    p = sub.add_parser("agent", help="run this host's agent (the driver behind an authenticated HTTP API)",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE", help="TOML file with [agent] and [driver] tables")
    p.set_defaults(func=run)


def build_driver(config: AgentConfig) -> ComputeDriver:
    """The driver the configuration names (agent/drivers.py).

    :raises DriverError: the libvirt driver's settings are unusable.
    """
    from agent.drivers import build_driver as build
    return build(config)


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; 2 for an unusable configuration."""
    import uvicorn

    from agent import AgentConfig, create_app
    from agent.config import KEEP_ALIVE_SECONDS
    from driver.errors import DriverError

    try:
        config = AgentConfig.load(args.config)
        tls = config.serving_tls(args.config)
        driver = build_driver(config)
    except DriverError as e:  # agent.ConfigError is one: a one-line message naming the setting
        print(f"coldferry agent: {e}", file=sys.stderr)
        return 2
    # A daemon's job log is wanted without -v; -v/-vv still lower the level further.
    for name in ("agent", "driver", __name__):
        logger = logging.getLogger(name)
        logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    dc = config.driver_config
    app = create_app(driver, config.token, config.address, shutdown_timeout=dc.shutdown_timeout,
                     shutdown_retry_interval=dc.shutdown_retry_interval)
    banner = (f"coldferry agent of {dc.host_name} ({config.driver} driver, data-plane address {config.address}) "
              f"listening on {'https' if tls else 'http'}://{_host(config.listen)}:{config.port}"
              + (" (clients need a certificate signed by tls_client_ca)" if tls and tls.client_ca else ""))

    class Server(uvicorn.Server):  # here because uvicorn is imported only when the agent runs
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:  # the socket is bound: say so once
                log.info("%s", banner)

    server = Server(uvicorn.Config(app, host=config.listen, port=config.port, log_config=None,
                                   timeout_keep_alive=KEEP_ALIVE_SECONDS, **(tls.uvicorn_options() if tls else {})))
    server.run()
    return 0 if server.started else 1


def _host(listen: str) -> str:
    """``listen`` as the host part of a URL (IPv6 in brackets)."""
    return f"[{listen}]" if ":" in listen else listen
