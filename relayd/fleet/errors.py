"""The fleet's one error, importable without the database driver."""

from __future__ import annotations

from relayd.errors import RelaydError

__all__ = ["FleetUnavailable"]


class FleetUnavailable(RelaydError):
    """The fleet database cannot be used now: go on locally."""
