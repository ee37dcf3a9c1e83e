"""The shared-storage marker: which host's migration shares an instance directory with another host.

On shared storage a cold migration keeps no ``_resize`` directory: the
instance directory is the only copy, seen by the source and the
destination. The source writes ``.coldferry-shared`` into it before the
migration's copy step, naming itself and the destination, and removes it
on confirm, revert or rollback. While it is there, no host deletes the
directory (``destroy`` keeps the files).
"""

from __future__ import annotations

import json
import logging
import os
import time

from .layout import Layout, write_atomic

log = logging.getLogger(__name__)

MARKER = ".coldferry-shared"


def path(layout: Layout, uuid: str) -> str:
    return os.path.join(layout.instance_dir(uuid), MARKER)


def mark(layout: Layout, uuid: str, source_host: str, dest: str) -> None:
    """Record that ``source_host`` is migrating ``uuid`` to ``dest`` over one shared directory."""
    note = {"source_host": source_host, "dest": dest, "instance_uuid": uuid,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_atomic(path(layout, uuid), json.dumps(note) + "\n")


def source_host(layout: Layout, uuid: str) -> str | None:
    """The host whose migration shares the directory; None without a marker.

    A marker that cannot be read or parsed answers ``"unknown host"``: it
    still says the directory is shared, which is what matters.
    """
    try:
        with open(path(layout, uuid)) as f:
            return str(json.load(f)["source_host"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("unreadable shared-storage marker %s (%s); treating it as another host's", path(layout, uuid), e)
        return "unknown host"


def unmark(layout: Layout, uuid: str, this_host: str) -> None:
    """Remove this host's marker (its migration ended); another host's stays."""
    owner = source_host(layout, uuid)
    if owner is None:
        return
    if owner != this_host:
        log.warning("leaving %s: it is %s's, not this host's (%s)", path(layout, uuid), owner, this_host)
        return
    os.unlink(path(layout, uuid))
