"""The ``coldferry`` command."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

DESCRIPTION = """\
coldferry cold-migrates KVM virtual machines between hosts with real disk transfer.

Commands:
  server    list servers, migrate one (to a chosen or scheduler-picked host), confirm or revert
  host      list hosts, enable/disable their compute service, check a destination, drain a host
  host-servers-migrate
            drain a host: move every server away (alias of 'host drain')
  copy      copy one disk image to another host over SSH (stream or rsync)
  checksum  print the image digest of a local file (the value copy compares)
  driver    run one hypervisor driver call on this host (JSON in and out)
  receive   the receiving end of a stream copy; started over SSH by 'copy'
  agent     run the per-host agent (serves this host's driver over HTTP)
  controller
            run the controller (HTTP API, migration records, scheduler, drains)
  tls       make a small CA and the controller's and agents' TLS certificates

The server and host commands talk to the controller: give --url and --token,
or set COLDFERRY_URL and COLDFERRY_TOKEN, or write them to
~/.config/coldferry/client.toml ([client] url = ..., token = ...); an https
controller is checked against --ca-file, COLDFERRY_CA_FILE or ca_file there.
"""


#: The modules that register the subcommands, in the order --help lists them.
MODULES = ("server_cmd", "host_cmd", "copy_cmd", "driver_cmd", "agent_cmd", "controller_cmd", "tls_cmd")
#: Commands run once per disk copy, often on the far end of an SSH session: they load
#: only their own module, not the HTTP client, the tables and the servers (about 0.3 s).
LEAN = {"copy": "copy_cmd", "checksum": "copy_cmd", "receive": "copy_cmd", "remote-fs": "copy_cmd"}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line, or only the module of a lean command named in ``argv``."""
    parser = argparse.ArgumentParser(prog="coldferry", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v: info, -vv: debug) to standard error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    command = _command(argv)
    modules = (LEAN[command],) if command in LEAN else MODULES
    for name in modules:
        importlib.import_module(f"coldferry.{name}").register(sub)
    return parser


def _command(argv: Sequence[str] | None) -> str | None:
    """The subcommand named in ``argv``: the first word that is not an option."""
    for word in argv or ():
        if not word.startswith("-"):
            return word
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
