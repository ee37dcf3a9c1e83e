"""Settings of the xenserver driver, read from the ``[xenserver]`` table of a TOML file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..settings import load, positive, setting


@dataclass(frozen=True)
class XenServerSettings:
    """The stubbed XenServer host an agent serves.

    ``sr_path`` is the SR directory of VHD files, the same path on every host
    (the copier sends into it); ``state_path`` the stub's JSON record file
    (default ``<sr_path>/.xapi-stub.json``); ``coalesce_timeout`` bounds the
    wait for the SR to merge a leaf back after a failure or a revert. The
    copier's SSH and transfer settings are those of ``[driver]``.
    """

    sr_path: str = setting("", hint="an absolute directory path", check=os.path.isabs)
    state_path: str | None = setting(None, hint="an absolute file path", check=lambda v: v is None or os.path.isabs(v))
    coalesce_timeout: float = setting(60.0, hint="seconds, more than 0", check=positive)

    @classmethod
    def from_dict(cls, data: Any, source: str = "configuration") -> "XenServerSettings":
        """Build from the ``[xenserver]`` table; ``source`` names the file in errors.

        :raises SettingsError: a setting is unknown or bad.
        """
        return load(cls, data, "xenserver", source)
