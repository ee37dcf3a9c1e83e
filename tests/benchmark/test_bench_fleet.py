"""scripts/bench-fleet end to end at a small size: every figure of the report is there.

Selected with ``-m benchmark``; kept out of the default run by pyproject's addopts.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmark import load_script

LISTS = {"host list", "server list", "server list --host", "migration list", "migration list --host --status",
         "migration list --status error", "migration list --server"}


@pytest.mark.benchmark
@pytest.mark.timeout(1800)
def test_fleet_benchmark_reports_every_list_drain_and_growth(tmp_path: Path) -> None:
    status = load_script("bench-fleet").main([
        "--hosts", "12", "--scales", "60,120", "--records", "40", "--samples", "3", "--cli-samples", "2",
        "--one-migrations", "1", "--drain-hosts", "3", "--max-servers", "1,4", "--migration-seconds", "0.4",
        "--out", str(tmp_path)])

    [report] = tmp_path.glob("fleet-*.json")
    data = json.loads(report.read_text())
    assert [s["servers"] for s in data["scales"]] == [60, 120]
    for scale in data["scales"]:
        assert set(scale["lists"]) == {"1", "2"}
        for lists in scale["lists"].values():
            assert set(lists["api"]) == set(lists["cli"]) == LISTS
            for t in [*lists["api"].values(), *lists["cli"].values()]:
                assert 0 < t["p50_s"] <= t["p99_s"]
        api = scale["lists"]["1"]["api"]
        assert api["host list"]["rows"] == 12
        assert api["server list"]["rows"] == scale["servers"]
        assert api["server list --host"]["rows"] == scale["servers"] // 12
        assert api["migration list"]["rows"] == 40   # the one migration alone comes after the one-controller lists
        assert scale["one_migration"]["runs"][0]["status"] == "finished"
        assert [(d["controllers"], d["max_servers"]) for d in scale["drains"]] == [(1, 1), (1, 4), (2, 1), (2, 4)]
        for d in scale["drains"]:
            assert d["complete"] and d["errors"] == 0 and not d["drain_errors"], d
            assert d["migrations"] == d["done"] == 3 * scale["servers"] // 12
            assert d["elapsed_s"] > 0 and d["ideal_s"] > 0
    assert "one migration alone" in data["growth"]
    assert all(len(g["slopes"]) == 1 for g in data["growth"].values())
    assert status == 0
    text = report.with_suffix(".md").read_text()
    for heading in ("## API, 1 controller(s)", "## CLI (`coldferry ...`), 2 controller(s)",
                    "## One migration alone", "## Drains", "## Faster than linear"):
        assert heading in text
