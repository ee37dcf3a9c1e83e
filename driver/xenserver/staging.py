"""The copied files on the destination: their names, and turning them into a VDI chain.

The source copies each disk's VHDs into the destination SR under staging
names (``migrate-<instance>-<device>-<depth>.vhd``, depth 0 the leaf), plus
``migrate-<instance>.json`` with the power-off time. The destination
renames the VHDs to fresh VDI uuids (as XenServer names files in a file
SR), relinks each child to its copied parent, validates the chain and
introduces the VDIs. A chain that fails to link or validate gets its
staging names back, so ``destroy`` finds and removes it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from ..errors import DriverError
from ..model import DiskInfo
from . import vhd
from .session import Session


def staged_name(uuid: str, userdevice: str, depth: int) -> str:
    """The destination file of one copied VHD: depth 0 is the leaf, 1 its parent, and so on."""
    return f"migrate-{uuid}-{userdevice}-{depth}.vhd"


def metadata_name(uuid: str) -> str:
    return f"migrate-{uuid}.json"


def is_staged(name: str, uuid: str) -> bool:
    """Whether ``name`` in an SR is a staged file of instance ``uuid`` (or a partial copy of one)."""
    return name.lstrip(".").startswith(f"migrate-{uuid}")


def device_name(userdevice: str) -> str:
    """The guest's name of VBD device number ``userdevice``: 0 is xvda."""
    return f"xvd{chr(ord('a') + int(userdevice))}"


def userdevice(device: str) -> str:
    return str(ord(device[-1]) - ord("a"))


def write_metadata(path: str, meta: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(meta, f)


def read_metadata(sr_path: str, uuid: str) -> dict[str, Any]:
    """The metadata the source sent; raises DriverError if it did not arrive."""
    try:
        with open(os.path.join(sr_path, metadata_name(uuid))) as f:
            meta: dict[str, Any] = json.load(f)
    except (OSError, ValueError) as e:
        raise DriverError(reason=f"the migration metadata of {uuid} is missing here: {e}") from None
    return meta


def import_chain(session: Session, sr: str, leaf: DiskInfo, disks: list[DiskInfo], new_uuid: Callable[[], str],
                 created: list[str]) -> str:
    """Make the copied chain under ``leaf`` VDIs of ``sr``; return the leaf's VDI ref.

    Every VDI introduced is appended to ``created`` (for the caller's undo).

    :raises ImageError: a copied VHD is corrupt or not the parent its child was made from.
    """
    sr_path = session.sr_get_path(sr)
    by_name = {d.path: d for d in disks}
    staged = [leaf]
    while staged[-1].backing_file:
        staged.append(by_name[staged[-1].backing_file])
    uuids = [new_uuid() for _ in staged]
    moves = [(os.path.join(sr_path, d.path), os.path.join(sr_path, f"{u}.vhd"))
             for d, u in zip(staged, uuids, strict=True)]
    for old, new in moves:
        os.rename(old, new)
    try:
        new_paths = [new for _old, new in moves]
        for child, parent in zip(reversed(new_paths[:-1]), reversed(new_paths[1:]), strict=True):
            vhd.relink(child, parent)  # checks the copy is the parent the child was made from
        vhd.validate_chain(new_paths[0])
    except BaseException:
        for old, new in moves:
            os.rename(new, old)
        raise
    ref = ""
    for depth in range(len(staged) - 1, -1, -1):  # parents first: a VDI's parent must exist
        ref = session.vdi_introduce(sr, uuids[depth], f"{uuids[depth]}.vhd", managed=depth == 0)
        created.append(ref)
    return ref
