"""scripts/bench-transfer end to end at a small scale: every copier's result must verify,
and every time includes making the target durable.

Selected with ``-m benchmark``; kept out of the default run by pyproject's addopts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def bench_main():
    sys.path.insert(0, str(SCRIPTS))
    try:
        from benchlib import main
        yield main
    finally:
        sys.path.remove(str(SCRIPTS))


@pytest.mark.benchmark
@pytest.mark.timeout(1800)
def test_every_copier_result_verifies(bench_main, tmp_path: Path) -> None:
    status = bench_main(["--scale", "0.05", "--runs", "1", "--out", str(tmp_path)])

    [report] = tmp_path.glob("transfer-*.json")
    results = json.loads(report.read_text())
    problems = {f"{case['case']}/{r['tool']}": r["status"]
                for case in results["cases"] for r in case["results"]
                if r["status"] != "ok" or not r["verified"]}
    assert problems == {}
    assert status == 0
    # Durable for durable: every run's time is its copier's and then the sync of its target.
    for case in results["cases"]:
        for r in case["results"]:
            for run in r["runs"]:
                assert run["sync_seconds"] is not None and run["sync_seconds"] >= 0, (case["case"], r["tool"])
                assert run["durable_seconds"] == pytest.approx(run["seconds"] + run["sync_seconds"])
            assert r["median_seconds"] >= r["median_delivered_seconds"], (case["case"], r["tool"])
    assert (tmp_path / report.name.replace(".json", ".md")).is_file()
    resume = results["resume"]  # at this scale the copy may finish before it can be killed
    assert resume["verified"] or resume["verdict"] == "n/a", resume
