"""Nova's compute API, the subset that migrates servers, at /v2.1 (docs/api.md)."""

from .app import PREFIX, create_nova_app, mount_nova

__all__ = ["PREFIX", "create_nova_app", "mount_nova"]
