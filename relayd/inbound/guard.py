"""Failed client logins, counted across every accepting process (SPEC routing rule 1).

Five failed AUTHs from one address within a minute, and that address hears ``421 4.7.0`` at
AUTH for a minute, from every process that accepts: connections are spread over several
processes, and a guesser must not get five tries from each of them.

The counts live in ``<state>/login-failures``, a small file every process maps into memory
(``mmap``, shared): a fixed table of slots, one per peer address (by hash), each holding the
last failures' times and the end of a block. Writers take an ``flock`` on the file; a reader
asking "is this address blocked?" reads one number without it. The clock is the monotonic
one, which all processes of a machine share. The table is emptied at every start: blocks
are a minute long, nothing worth keeping across a restart.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import struct
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

__all__ = ["FAILURES_FILE", "FailureBook", "LocalFailures", "LoginGuard", "SharedFailures"]

FAILURES_FILE = "login-failures"
MAX_FAILURES = 5


class FailureBook(Protocol):
    def add(self, peer: str, now: float, window: float) -> int:
        """Record a failure; how many fell within the last ``window`` seconds."""
        ...

    def block(self, peer: str, until: float) -> None: ...

    def blocked_until(self, peer: str) -> float: ...


class LoginGuard:
    """The rule, over a ``FailureBook`` (shared between processes in the daemon).

    Only AUTH is refused, not the connection: on a loopback listener every local application
    shares 127.0.0.1, and one with a wrong password must not stop cron's anonymous mail.
    A successful login does not reset the count, or one valid password would buy unlimited
    guesses at the others.
    """

    def __init__(
        self,
        book: FailureBook | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_failures: int = MAX_FAILURES,
        window: float = 60.0,
        block_for: float = 60.0,
    ) -> None:
        self.book = book if book is not None else LocalFailures()
        self.clock = clock
        self.max_failures = max_failures
        self.window = window
        self.block_for = block_for

    def blocked(self, peer: str) -> bool:
        return self.clock() < self.book.blocked_until(peer)

    def failed(self, peer: str) -> None:
        now = self.clock()
        if self.book.add(peer, now, self.window) >= self.max_failures:
            self.book.block(peer, now + self.block_for)


class LocalFailures:
    """One process's own book (the main process when nothing else accepts; tests)."""

    def __init__(self) -> None:
        self._failures: dict[str, deque[float]] = {}
        self._blocked: dict[str, float] = {}

    def add(self, peer: str, now: float, window: float) -> int:
        failures = self._failures.setdefault(peer, deque(maxlen=MAX_FAILURES))
        failures.append(now)
        while failures and failures[0] <= now - window:
            failures.popleft()
        if len(self._failures) > 4096:  # a scan from many addresses: forget the stale ones
            self._failures = {p: f for p, f in self._failures.items() if f and f[-1] > now - 60}
        return len(failures)

    def block(self, peer: str, until: float) -> None:
        self._blocked[peer] = until
        self._failures.pop(peer, None)

    def blocked_until(self, peer: str) -> float:
        return self._blocked.get(peer, 0.0)


# A slot: the peer's hash, the times of its last MAX_FAILURES failures (0 = none), the end
# of its block.
_SLOT = struct.Struct(f"<Q{MAX_FAILURES}dd")
SLOTS = 4096


def _digest(peer: str) -> int:
    return int.from_bytes(hashlib.blake2b(peer.encode(), digest_size=8).digest(), "little") | 1


class SharedFailures:
    """The book in a file mapped by every accepting process (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = _SLOT.size * SLOTS
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size, mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    @classmethod
    def create(cls, state_directory: Path) -> SharedFailures:
        """Empty at start: made anew by the main process before the others are started."""
        path = state_directory / FAILURES_FILE
        path.unlink(missing_ok=True)
        return cls(path)

    def _slot(self, peer: str) -> tuple[int, int]:
        key = _digest(peer)
        return key, (key % SLOTS) * _SLOT.size

    def add(self, peer: str, now: float, window: float) -> int:
        key, offset = self._slot(peer)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            found, *times_and_block = _SLOT.unpack_from(self._map, offset)
            times, until = list(times_and_block[:MAX_FAILURES]), times_and_block[MAX_FAILURES]
            if found != key:  # another address had the slot: it is this one's now
                times, until = [0.0] * MAX_FAILURES, 0.0
            recent = [t for t in times if t > now - window][-(MAX_FAILURES - 1) :]
            times = [*recent, now]
            padded = [0.0] * (MAX_FAILURES - len(times)) + times
            _SLOT.pack_into(self._map, offset, key, *padded, until)
            return len(times)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def block(self, peer: str, until: float) -> None:
        key, offset = self._slot(peer)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            _SLOT.pack_into(self._map, offset, key, *([0.0] * MAX_FAILURES), until)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def blocked_until(self, peer: str) -> float:
        key, offset = self._slot(peer)
        found, *rest = _SLOT.unpack_from(self._map, offset)
        return float(rest[MAX_FAILURES]) if found == key else 0.0

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)
