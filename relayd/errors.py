"""relayd's exception hierarchy: a short flat tree, library errors mapped at the boundary."""

from __future__ import annotations

__all__ = ["RelaydError", "SpoolError"]


class RelaydError(Exception):
    """Root of every error relayd raises on purpose."""


class SpoolError(RelaydError, OSError):
    """The spool could not store or read a message; the client gets 452 4.3.1, never 250."""
