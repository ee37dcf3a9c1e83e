"""Placeholder: filled in by the agent/controller/CLI work (issue 4)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Not written yet."""
