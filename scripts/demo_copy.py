"""The coldferry demo: copy a sparse disk image and a file of random data to
two SSH endpoints on this machine, with the stream method to endpoint A and
the rsync method to endpoint B, and verify every copy.

Each endpoint is a private OpenSSH sshd on a loopback port with keys of its
own (tests/support/sshd.py); the machine's sshd and ~/.ssh are not touched.
Everything lives in one temporary directory, removed at the end.
Run it through scripts/demo-copy, which sets the machine up first.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support.sshd import Sshd  # noqa: E402  (needs the repo root on sys.path)

COLDFERRY = REPO / ".venv" / "bin" / "coldferry"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
IMAGE_SIZE = GiB
# The image's written pieces as (offset, length, random?); everything else is a hole.
# 64 MiB of random data in four places, one not block-aligned, and a 16 MiB run
# of written zeros that takes disk space but is never sent.
IMAGE_PIECES = [
    (0, 16 * MiB, True),
    (300 * MiB + 68 * KiB, 16 * MiB, True),
    (512 * MiB, 16 * MiB, False),
    (700 * MiB, 16 * MiB, True),
    (IMAGE_SIZE - 16 * MiB, 16 * MiB, True),
]
RANDOM_FILE_SIZE = 64 * MiB


def make_sources(directory: Path) -> list[Path]:
    """Write the sparse image and the random file; return their paths."""
    directory.mkdir()
    image = directory / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
        for offset, length, random in IMAGE_PIECES:
            f.seek(offset)
            f.write(os.urandom(length) if random else bytes(length))
    data = directory / "random.bin"
    data.write_bytes(os.urandom(RANDOM_FILE_SIZE))
    return [image, data]


def du(path: Path) -> str:
    """'<apparent> apparent, <allocated> allocated', both as du reports them."""
    apparent = subprocess.run(["du", "-h", "--apparent-size", str(path)], check=True,
                              capture_output=True, text=True).stdout.split()[0]
    allocated = subprocess.run(["du", "-h", str(path)], check=True,
                               capture_output=True, text=True).stdout.split()[0]
    return f"{apparent} apparent, {allocated} allocated"


def copy(method: str, src: Path, endpoint: Sshd, dest: Path) -> bool:
    """Copy ``src`` to ``dest`` on ``endpoint`` with the coldferry CLI; print its summary."""
    argv = [str(COLDFERRY), "copy", "--method", method,
            "--ssh-port", str(endpoint.port), "--identity", str(endpoint.identity),
            "--known-hosts", str(endpoint.known_hosts),
            "--remote-command", f"{shlex.quote(str(COLDFERRY))} receive",
            str(src), f"{endpoint.user}@{endpoint.host}:{dest}"]
    print(f"$ {shlex.join(['coldferry', *argv[1:]])}", flush=True)
    # The summary is on stdout; errors and the progress bar (on a terminal) go to stderr.
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True)
    if done.stdout.strip():
        print(f"  {done.stdout.strip()}")
    if done.returncode != 0:
        print(f"  FAILED: coldferry copy exited with {done.returncode}; its error is above")
        return False
    return True


def digest(argv: list[str]) -> str:
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return out.split()[0]


def verify(src: Path, endpoint: Sshd, dest: Path) -> bool:
    """Compare image digests on both ends and the bytes with cmp; show the target's size."""
    here = digest([str(COLDFERRY), "checksum", str(src)])
    remote = shlex.join([str(COLDFERRY), "checksum", str(dest)])
    there = digest(["ssh", *endpoint.ssh_args, f"{endpoint.user}@{endpoint.host}", remote])
    same_digest = here == there
    print(f"  checksum  source {here}")
    print(f"  checksum  target {there} (on the endpoint, over ssh): "
          f"{'same' if same_digest else 'DIFFERENT'}")
    same_bytes = subprocess.run(["cmp", str(src), str(dest)]).returncode == 0
    print(f"  cmp       {'identical' if same_bytes else 'DIFFERENT'}")
    print(f"  du        source {du(src)}; target {du(dest)}")
    return same_digest and same_bytes


def run(workdir: Path) -> int:
    endpoints: list[Sshd] = []
    try:
        for name in ("a", "b"):
            endpoints.append(Sshd.start(workdir / f"sshd-{name}"))
        a, b = endpoints
        print(f"endpoint A: sshd pid {a.proc.pid} on {a.host}:{a.port}")
        print(f"endpoint B: sshd pid {b.proc.pid} on {b.host}:{b.port}")
        sources = make_sources(workdir / "source")
        for src in sources:
            print(f"source {src.name}: {du(src)}")
        results: dict[str, bool] = {}
        for method, label, endpoint in (("stream", "A", a), ("rsync", "B", b)):
            print(f"\n== --method {method} to endpoint {label}")
            target_dir = workdir / f"target-{label.lower()}"
            target_dir.mkdir()
            for src in sources:
                dest = target_dir / src.name
                ok = copy(method, src, endpoint, dest) and verify(src, endpoint, dest)
                results[f"{method} {src.name}"] = ok
    finally:
        for endpoint in endpoints:
            endpoint.stop()
    print("\n== result")
    for what, ok in results.items():
        print(f"  {what}: {'copied and verified' if ok else 'FAILED'}")
    return 0 if all(results.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo-copy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (images, sshd logs) for a look")
    args = parser.parse_args()
    if not COLDFERRY.exists():
        print(f"demo: {COLDFERRY} is missing; run scripts/demo-copy, which installs it", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="coldferry-demo-"))
    print(f"working directory: {workdir}")
    try:
        return run(workdir)
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
