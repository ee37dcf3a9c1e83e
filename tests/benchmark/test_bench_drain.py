"""scripts/bench-drain end to end at a small scale: a drain and migrations alone run side by side,
every guest moves and verifies, and the report gives the target's figures.

Selected with ``-m benchmark``; kept out of the default run by pyproject's addopts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.benchmark import load_script


@pytest.mark.benchmark
@pytest.mark.timeout(1200)
def test_drain_benchmark_moves_every_guest_and_reports_the_ratio(tmp_path: Path) -> None:
    status = load_script("bench-drain").main(["--guests", "4", "--max-servers", "2", "--data-mib", "16",
                                              "--singles", "2", "--out", str(tmp_path)])

    [report] = tmp_path.glob("drain-*.json")
    data = json.loads(report.read_text())
    singles, drain, fig = data["singles"], data["drain"], data["figures"]
    assert [r["kind"] for r in singles] == ["single", "single"]
    assert len(drain["rows"]) == 4 and drain["error"] is None, drain
    for r in [*singles, *drain["rows"]]:
        assert r["verified"] and r["status"] == "finished", r
        assert r["to"] == "host2" and r["bytes_sent"] >= 16 << 20, r
        assert 0 <= r["start_s"] < r["end_s"], r
    assert all(r["row_status"] == "done" for r in drain["rows"])
    # At most --max-servers migrations of the drain ran at any moment.
    for r in drain["rows"]:
        overlapping = [o for o in drain["rows"] if o["start_s"] <= r["start_s"] < o["end_s"]]
        assert len(overlapping) <= 2, drain["rows"]
    one = sum(r["duration_s"] for r in singles) / 2
    assert fig["one_migration_s"] == pytest.approx(one, abs=0.01)
    assert fig["ideal_s"] == pytest.approx(math.ceil(4 / 2) * one, abs=0.02)
    assert fig["ratio"] == pytest.approx(drain["seconds"] / fig["ideal_s"], abs=0.002)
    assert fig["pass"] == (fig["ratio"] <= 1.2)
    assert len(fig["idle_slot_s"]) == 2
    assert status == 0
    text = report.with_suffix(".md").read_text()
    assert "| run | guest | to |" in text and "## Target" in text and "## Where the drain's time went" in text
    assert f"drain / ideal = {fig['ratio']:.2f}" in text
