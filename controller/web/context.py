"""What the dashboard's routes work with: the controller's parts, the users and the renderer."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..conductor import Conductor
from ..drain import Drainer
from ..inventory import Inventory
from ..store import Store
from .auth import Users
from .render import Renderer
from .throttle import LoginThrottle


@dataclass(frozen=True)
class Dashboard:
    conductor: Conductor
    drainer: Drainer
    store: Store
    users: Users
    renderer: Renderer
    #: How often the results page asks for its drain's rows, in milliseconds.
    poll_ms: int = 1000
    #: Failed logins per user name and per client address.
    throttle: LoginThrottle = field(default_factory=LoginThrottle)

    @property
    def inventory(self) -> Inventory:
        return self.conductor.inventory


def local_path(candidate: str | None, default: str) -> str:
    """``candidate`` if it is a path inside the dashboard (``/migrations?status=finished``), else
    ``default``: a redirect target taken from a form or a query must never lead off the site."""
    if not candidate or not candidate.startswith("/") or candidate.startswith("//") or "\\" in candidate:
        return default
    if any(c.isspace() or ord(c) < 32 for c in candidate):
        return default
    return candidate
