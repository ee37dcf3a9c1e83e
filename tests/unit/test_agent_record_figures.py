"""The copy figures of a cold migration, end to end: driver -> agent job -> controller record -> API -> CLI.

In-memory hosts behind real agent apps and a real SQLite store (controller_env).
The source's driver is wrapped to report a pre-copy the way the libvirt driver
does: a first copy while the server ran, and one after its power-off.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from coldferry import output
from coldferry.server_cmd import MIGRATION_SHOWN
from controller.records import MigrationStatus
from transfer.result import CopyResult

from .controller_env import Env

VM = "5b7d0c4e-0000-4000-8000-0000000000a1"
GiB, MiB = 1 << 30, 1 << 20


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = Env.make(tmp_path, n=2)
    e.add("host1", VM, "web")
    return e


def precopying(env: Env, before: int, after: int) -> None:
    drv = env.drivers["host1"]
    real = drv.migrate_disk_and_power_off

    def migrate(instance, *args, **kw):
        outcome = real(instance, *args, **kw)
        copies = [CopyResult("precopy", before, before, before, 0, 0, 4.0, "xxh3:01"),
                  CopyResult("stream", before, after, after, before - after, 0, 1.0, "xxh3:02")]
        return dataclasses.replace(outcome, copies=copies, precopy=True, bytes_before_power_off=before)
    drv.migrate_disk_and_power_off = migrate  # type: ignore[method-assign]


def test_precopy_figures_reach_the_record_the_api_and_the_cli(env: Env, capsys) -> None:
    precopying(env, 8 * GiB, 3 * MiB)
    m = env.wait(env.conductor.migrate("web", "host2").id)
    assert m.status == MigrationStatus.FINISHED, m.error
    assert (m.precopy, m.bytes_before_power_off, m.bytes_after_power_off) == (True, 8 * GiB, 3 * MiB)
    assert m.downtime_s is not None and m.downtime_s >= 0
    # The record carries the agent's totals as they are, not summed again.
    assert (m.bytes_sent, m.bytes_skipped, m.digests) == (8 * GiB + 3 * MiB, 8 * GiB - 3 * MiB, ["xxh3:01", "xxh3:02"])
    assert m.rate == (8 * GiB + 3 * MiB) / 5.0 and m.shared is False

    shown = env.api().get(f"/v1/os-migrations/{m.id}").json()
    assert (shown["precopy"], shown["bytes_before_power_off"], shown["bytes_after_power_off"]) == (
        True, 8 * GiB, 3 * MiB)
    assert shown["downtime_s"] == m.downtime_s
    listed = env.api().get("/v1/os-migrations").json()["migrations"]
    assert [r["bytes_before_power_off"] for r in listed] == [8 * GiB]

    output.print_record(shown, "table", MIGRATION_SHOWN)
    table = capsys.readouterr().out
    assert "bytes_before_power_off" in table and f"{8 * GiB} (8.0 GiB)" in table
    assert f"{3 * MiB} (3.0 MiB)" in table and f"{m.downtime_s:.3f} s" in table
    output.print_record(shown, "json", MIGRATION_SHOWN)
    assert json.loads(capsys.readouterr().out)["bytes_after_power_off"] == 3 * MiB


def test_without_precopy_every_byte_counts_after_the_power_off(env: Env) -> None:
    m = env.wait(env.conductor.migrate("web", "host2").id)
    assert m.status == MigrationStatus.FINISHED, m.error
    assert m.bytes_sent > 0 and not m.precopy
    assert (m.bytes_before_power_off, m.bytes_after_power_off) == (0, m.bytes_sent)
