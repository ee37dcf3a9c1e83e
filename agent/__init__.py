"""The per-host agent: one driver served over an authenticated HTTP API, long calls as jobs."""

from .app import create_app
from .config import AgentConfig, ConfigError
from .jobs import Job, JobConflict, JobNotFound, JobRunner

__all__ = ["AgentConfig", "ConfigError", "Job", "JobConflict", "JobNotFound", "JobRunner", "create_app"]
