"""Every secret value in a loaded config, for the log redactor."""

from __future__ import annotations

import dataclasses
from typing import Any

from relayd.config.model import Config, Secret

__all__ = ["all_secret_values"]


def _walk(value: Any, found: list[str], seen: set[int]) -> None:
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, Secret):
        found.append(value.reveal())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _walk(getattr(value, f.name), found, seen)
    elif isinstance(value, dict):
        for item in value.values():
            _walk(item, found, seen)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _walk(item, found, seen)


def all_secret_values(config: Config) -> list[str]:
    found: list[str] = []
    _walk(config, found, set())
    return found
