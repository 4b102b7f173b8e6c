"""Per-account health kept on disk, so a pause survives restarts (SPEC "Delivery")."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from relayd.core.health import AccountHealth

__all__ = ["AccountStore"]

log = logging.getLogger(__name__)


def _file_name(address: str) -> str:
    # Addresses may hold characters that are awkward in file names; the digest keeps names
    # flat and fixed-length, the address itself is inside the file.
    return hashlib.sha256(address.lower().encode()).hexdigest()[:32] + ".json"


class AccountStore:
    def __init__(self, state_directory: Path, *, fsync: bool = True) -> None:
        self.root = state_directory / "accounts"
        self.fsync = fsync

    def prepare(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def load(self, address: str) -> AccountHealth:
        path = self.root / _file_name(address)
        try:
            data = json.loads(path.read_bytes())
            return AccountHealth.from_dict(data)
        except FileNotFoundError:
            return AccountHealth(address=address.lower())
        except (ValueError, TypeError) as exc:
            log.error("account state for %s unreadable (%s); starting afresh", address, exc)
            return AccountHealth(address=address.lower())

    def load_all(self) -> dict[str, AccountHealth]:
        result: dict[str, AccountHealth] = {}
        if not self.root.exists():
            return result
        for path in self.root.glob("*.json"):
            try:
                health = AccountHealth.from_dict(json.loads(path.read_bytes()))
            except (ValueError, TypeError, OSError):
                continue
            result[health.address] = health
        return result

    def save(self, health: AccountHealth) -> None:
        """Atomic replace (write, fsync, rename): never a half-written pause state."""
        path = self.root / _file_name(health.address)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, json.dumps(health.to_dict(), sort_keys=True).encode())
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
