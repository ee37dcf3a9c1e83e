"""The set-up scripts: bash syntax of every script, and scripts/install being idempotent."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def bash_scripts() -> list[Path]:
    """Every file in scripts/ whose first line names bash, and .ci/run."""
    found = [REPO / ".ci" / "run"]
    for path in sorted((REPO / "scripts").iterdir()):
        if path.is_file():
            with open(path, "rb") as f:
                first = f.readline()
            if first.startswith(b"#!") and b"bash" in first:
                found.append(path)
    return found


@pytest.mark.parametrize("script", bash_scripts(), ids=lambda p: str(p.relative_to(REPO)))
def test_bash_syntax(script: Path) -> None:
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, f"{script}: {done.stderr}"


def run_install() -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(REPO / "scripts" / "install")], cwd="/",
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)


def test_install_is_idempotent() -> None:
    # scripts/test has already run it; under a bare pytest the first run here may still
    # have work to do, and then the run after it must find nothing left.
    done = run_install()
    assert done.returncode == 0, done.stdout + done.stderr
    if "install: nothing to do" not in done.stdout:
        done = run_install()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "install: nothing to do" in done.stdout, (
        f"a second scripts/install run still did something:\n{done.stdout}{done.stderr}")
    assert "apt-get" not in done.stdout and "pip install" not in done.stdout
