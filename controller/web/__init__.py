"""The controller's web dashboard: server-rendered pages for host maintenance, behind a login."""

from .app import create_dashboard, mount_dashboard

__all__ = ["create_dashboard", "mount_dashboard"]
