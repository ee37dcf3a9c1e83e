"""Commands run once per disk copy start without the controller client's imports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from coldferry.cli import build_parser

PROBE = """
import sys
from coldferry.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print(sorted(m for m in ("httpx", "rich.table", "fastapi", "sqlalchemy", "paramiko") if m in sys.modules))
"""


def loaded(argv: list[str]) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True,
                         check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("argv", [["receive", "--help"], ["copy", "--help"], ["-v", "checksum", "--help"]])
def test_copy_commands_load_no_controller_client(argv):
    assert loaded(argv) == "[]"


def test_other_commands_still_load_everything():
    assert "httpx" in loaded(["server", "--help"])


def test_a_lean_command_has_the_same_options_as_in_the_full_parser():
    lean = build_parser(["copy"])._subparsers._group_actions[0].choices["copy"]
    full = build_parser([])._subparsers._group_actions[0].choices["copy"]
    assert lean.format_help() == full.format_help()
    assert set(build_parser([])._subparsers._group_actions[0].choices) >= {"server", "host", "agent", "copy"}


COPY_PROBE = """
import socket, sys
from coldferry.cli import main
from transfer.source import Source
seen = []
real = Source.prefetch
def prefetch(self, *a, **k):
    loaded = "paramiko" in sys.modules
    real(self, *a, **k)
    seen.append((loaded, self.path, self._prefetch_pid != 0))  # read ahead by a child process
Source.prefetch = prefetch
import coldferry.copy_cmd as copy_cmd
real_bar = copy_cmd.progress_bar
def bar(*a, **k):  # rich's progress bar starts a thread: the read-ahead must come first
    seen.append("bar")
    return real_bar(*a, **k)
copy_cmd.progress_bar = bar
port = socket.socket(); port.bind(("127.0.0.1", 0))  # bound, never listening: the login is refused
rc = main(["copy", "--no-progress", "--ssh-port", str(port.getsockname()[1]), "--known-hosts", {kh!r},
           {src!r}, "root@127.0.0.1:/srv/copy.raw"])
print(rc, seen)
"""


def test_copy_reads_ahead_in_a_child_before_loading_the_ssh_client(tmp_path):
    src = tmp_path / "disk.raw"
    src.write_bytes(b"x" * 65536)
    kh = tmp_path / "known_hosts"
    kh.write_text("")
    out = subprocess.run([sys.executable, "-c", COPY_PROBE.format(src=str(src), kh=str(kh))],
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == f"1 [(False, {str(src)!r}, True), 'bar']"
    assert "error" in out.stderr
