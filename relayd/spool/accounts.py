"""Per-account health kept on disk, so a pause survives restarts (SPEC "Delivery")."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from relayd.core.health import AccountHealth

__all__ = ["HEALTH_SAVE_SECONDS", "AccountStore", "HealthBook"]

# An account's health is written at once when its state changes; a success that only moves
# ``last_success_at`` is written at most this often (it is shown by `relayd status`).
HEALTH_SAVE_SECONDS = 5.0

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


class HealthBook:
    """Every account's health, in memory and in the ``AccountStore``.

    A change of state (a pause above all) is written, fsync'd, before ``set`` returns. A
    delivery that only moves ``last_success_at`` is not worth an fsync'd write per message:
    it is written with the next change, by ``flush`` (the scheduler's timer, at most
    ``HEALTH_SAVE_SECONDS`` later, and at stop), or when the last write is that old.
    """

    def __init__(self, store: AccountStore) -> None:
        self.store = store
        self._health: dict[str, AccountHealth] = {}
        self._saved_at: dict[str, float] = {}
        self._unsaved: set[str] = set()

    def load(self) -> None:
        self._health = self.store.load_all()

    def get(self, address: str) -> AccountHealth:
        address = address.lower()
        if address not in self._health:
            self._health[address] = AccountHealth(address=address)
        return self._health[address]

    def __iter__(self) -> Iterator[AccountHealth]:
        return iter(list(self._health.values()))

    @property
    def unsaved(self) -> bool:
        return bool(self._unsaved)

    def set(self, health: AccountHealth) -> None:
        old = self._health.get(health.address)
        if old == health:
            return
        self._health[health.address] = health
        now = time.monotonic()
        if (
            old is not None
            and old.differs_only_in_success(health)
            and now - self._saved_at.get(health.address, -HEALTH_SAVE_SECONDS) < HEALTH_SAVE_SECONDS
        ):
            self._unsaved.add(health.address)
            return
        self._saved_at[health.address] = now
        self._save(health)

    def flush(self) -> None:
        for address in sorted(self._unsaved):
            self._saved_at[address] = time.monotonic()
            self._save(self._health[address])

    def _save(self, health: AccountHealth) -> None:
        """Written now, or, when the disk refuses (read-only, full), kept in memory and
        written by a later ``flush``: the state in force is this one either way."""
        try:
            self.store.save(health)
        except OSError as exc:
            if health.address not in self._unsaved:
                log.error(
                    "cannot save the account state of %s (%s); kept in memory, saved later",
                    health.address,
                    exc.strerror or exc,
                )
            self._unsaved.add(health.address)
            return
        self._unsaved.discard(health.address)
