"""The Message-ID field's value (RFC 5322 §3.6.4): pure text handling, no I/O."""

from __future__ import annotations

import re

__all__ = ["message_id_from"]

_MSG_ID = re.compile(r"<[^<>\s]+>")


def message_id_from(value: str) -> str | None:
    """``<id-left@id-right>`` from an (unfolded) field value; a value without angle
    brackets, as some applications write, is taken as it stands; None when empty."""
    match = _MSG_ID.search(value)
    if match is not None:
        return match.group(0)
    value = value.strip()
    return value or None
