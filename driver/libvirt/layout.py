"""Where an instance's files live under ``instances_path``, the same on every host (as in Nova).

``<instances_path>/<uuid>/`` holds an instance's disks and its saved definition
``domain.xml``; during a migration the source keeps that directory as
``<uuid>_resize`` until confirm or revert. Backing files live in the image
cache ``<instances_path>/_base/``.
"""

from __future__ import annotations

import os

XML_FILE = "domain.xml"
CACHE_DIR = "_base"
RESIZE_SUFFIX = "_resize"


class Layout:
    """The paths of one host's instances directory."""

    def __init__(self, instances_path: str) -> None:
        self.root = instances_path

    def instance_dir(self, uuid: str) -> str:
        return os.path.join(self.root, uuid)

    def resize_dir(self, uuid: str) -> str:
        """Where the source keeps the instance directory until confirm or revert."""
        return self.instance_dir(uuid) + RESIZE_SUFFIX

    def definition(self, uuid: str) -> str:
        """The saved domain XML that travels with the disks."""
        return os.path.join(self.instance_dir(uuid), XML_FILE)

    def cache_dir(self) -> str:
        return os.path.join(self.root, CACHE_DIR)

    @staticmethod
    def cache_name(backing_path: str) -> str:
        """A backing file's name relative to instances_path, in the image cache."""
        return f"{CACHE_DIR}/{os.path.basename(backing_path)}"

    def relative(self, path: str) -> str:
        """``path`` (under instances_path) as the name a remote file system call takes."""
        return os.path.relpath(path, self.root)


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so a reader never sees half of it."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
