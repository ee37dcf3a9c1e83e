"""scripts/bench-migrate end to end at a small scale: every migration moves, verifies and shows its timeline.

Selected with ``-m benchmark``; kept out of the default run by pyproject's addopts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmark import load_script


@pytest.mark.benchmark
@pytest.mark.timeout(1800)
def test_migrate_benchmark_reports_every_migration_with_its_phases_and_the_targets(tmp_path: Path) -> None:
    status = load_script("bench-migrate").main(["--sizes", "64,96", "--downtime-sizes", "0.125", "--downtime-runs", "1",
                                 "--interval", "0.3", "--out", str(tmp_path)])

    [report] = tmp_path.glob("migrate-*.json")
    data = json.loads(report.read_text())
    rows = data["rows"]
    assert [(r["state"], r["data_mib"], r["method"], r["from"], r["to"]) for r in rows] == [
        (state, mib, method, *hosts) for method, hosts in (("stream", ("host1", "host2")),
                                                           ("rsync", ("host2", "host1")))
        for state in ("shut-off", "running") for mib in (64, 96)]
    assert all(r["status"] == "finished" and r["verified"] for r in rows), rows
    for r in rows:
        phases = r["phases_s"]
        assert {"scheduled", "source_job", "connect", "copy", "copy_definition", "dest_job", "define"} <= set(phases)
        assert ("shutdown" in phases and "start" in phases) is (r["state"] == "running")
        disks = sum(p["seconds"] for p in r["timeline"] if p["phase"] == "copy" and p["detail"] == "disk")
        assert r["copies_s"] == pytest.approx(disks, abs=1e-3) and 0 < r["copies_s"] < r["wall_s"]
        assert r["overhead_s"] == pytest.approx(r["wall_s"] - r["copies_s"], abs=2e-3)
        assert r["bytes_sent"] >= r["data_mib"] << 20
        assert (r["downtime_s"] is not None) is (r["state"] == "running")
    downtime = data["downtime"]
    assert [(x["size_gib"], x["precopy_wanted"], x["verified"]) for x in downtime["summary"]] == [
        (0.125, True, 1), (0.125, False, 1)]
    assert sum("shut-off instance, 64 MiB" in t for t in data["targets"]) == 2
    assert status == 0
    text = report.with_suffix(".md").read_text()
    for heading in ("| guest | data | copier | pre-copy | wall s |", "## Timeline phases, seconds",
                    "## Pre-copy downtime", "## Targets"):
        assert heading in text
    assert len(list(tmp_path.glob("downtime-*.md"))) == 1
