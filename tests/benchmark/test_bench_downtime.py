"""scripts/bench-downtime end to end at a small scale: both rounds run, every guest verifies its records.

Selected with ``-m benchmark``; kept out of the default run by pyproject's addopts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmark import load_script


@pytest.mark.benchmark
@pytest.mark.timeout(1800)
def test_downtime_benchmark_runs_both_rounds_and_every_guest_verifies(tmp_path: Path) -> None:
    status = load_script("bench-downtime").main(["--sizes", "0.125,0.25", "--runs", "2", "--interval", "0.3",
                                                 "--out", str(tmp_path)])

    [report] = tmp_path.glob("downtime-*.json")
    data = json.loads(report.read_text())
    rows = data["rows"]
    assert [(r["size_gib"], r["precopy"], r["from"], r["to"]) for r in rows] == [
        (0.125, True, "host1", "host2"), (0.25, True, "host1", "host2"),
        (0.125, True, "host2", "host1"), (0.25, True, "host2", "host1"),
        (0.125, False, "host1", "host2"), (0.25, False, "host1", "host2")]
    assert all(r["verified"] and r["status"] == "finished" for r in rows), rows
    for r in rows:
        assert r["downtime_s"] > 0 and r["bytes_sent"] == r["bytes_before_power_off"] + r["bytes_after_power_off"]
        if r["precopy"]:  # the disk went before the power-off, only the overlay after
            assert r["bytes_before_power_off"] > r["size_gib"] * (1 << 30) * 0.9 > r["bytes_after_power_off"]
        else:
            assert r["bytes_before_power_off"] == 0
    assert status == 0
    text = report.with_suffix(".md").read_text()
    assert "| disk | pre-copy | downtime s |" in text and "## Targets" in text
    assert [(x["size_gib"], x["precopy_wanted"], x["runs"], x["verified"]) for x in data["summary"]] == [
        (0.125, True, 2, 2), (0.25, True, 2, 2), (0.125, False, 1, 1), (0.25, False, 1, 1)]
