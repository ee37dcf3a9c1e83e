"""The transfer benchmark behind ``scripts/bench-transfer``."""

from .cli import main

__all__ = ["main"]
