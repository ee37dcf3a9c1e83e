"""The ``coldferry`` command."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from coldferry import agent_cmd, controller_cmd, copy_cmd, driver_cmd, host_cmd, server_cmd

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

The server and host commands talk to the controller: give --url and --token,
or set COLDFERRY_URL and COLDFERRY_TOKEN, or write them to
~/.config/coldferry/client.toml ([client] url = ..., token = ...).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coldferry", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v: info, -vv: debug) to standard error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    server_cmd.register(sub)
    host_cmd.register(sub)
    copy_cmd.register(sub)
    driver_cmd.register(sub)
    agent_cmd.register(sub)
    controller_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
