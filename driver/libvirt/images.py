"""qemu-img, run with argument lists through an injectable runner."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import ImageError

Runner = Callable[[Sequence[str]], str]


def run(argv: Sequence[str]) -> str:
    """Run a command; return its stdout or raise ImageError with its stderr."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ImageError(path=argv[-1], reason=f"{argv[0]}: {e}") from None
    if proc.returncode:
        raise ImageError(path=argv[-1], reason=(proc.stderr or proc.stdout).strip()[-500:])
    return proc.stdout


@dataclass(frozen=True)
class ImageInfo:
    path: str
    format: str
    virtual_size: int
    actual_size: int
    backing_file: str
    backing_format: str


def info(path: str, runner: Runner = run) -> ImageInfo:
    """What qemu-img says about ``path`` (works on images in use: --force-share)."""
    data = json.loads(runner(["qemu-img", "info", "--output=json", "--force-share", path]))
    return ImageInfo(path, data.get("format", "raw"), int(data.get("virtual-size", 0)),
                     int(data.get("actual-size", 0)),
                     data.get("full-backing-filename") or data.get("backing-filename") or "",
                     data.get("backing-filename-format", ""))


def chain(path: str, runner: Runner = run) -> list[ImageInfo]:
    """``path`` and every image below it, top first."""
    out = [info(path, runner)]
    seen = {path}
    while out[-1].backing_file:
        nxt = out[-1].backing_file
        if nxt in seen or len(out) > 32:
            raise ImageError(path=path, reason="backing chain loops or is too deep")
        seen.add(nxt)
        out.append(info(nxt, runner))
    return out


def resize(path: str, fmt: str, size: int, runner: Runner = run) -> None:
    runner(["qemu-img", "resize", "-f", fmt, path, str(size)])


def rebase_unsafe(path: str, backing: str, backing_fmt: str, runner: Runner = run) -> None:
    """Point ``path`` at a new backing file name without touching data."""
    runner(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", backing_fmt, "-b", backing, path])


def flatten(path: str, out: str, runner: Runner = run) -> None:
    """Write ``path`` with its whole chain merged into a standalone qcow2 ``out``."""
    runner(["qemu-img", "convert", "-O", "qcow2", path, out])
