"""Files ready ahead of need for the receptions of an accepting process (``SpareFiles``).

A reception renames a spare to its ``tmp/`` name (a rename allocates nothing), and the pool
is refilled after the commit batch has answered its clients, so no client waits for a file.
A spare is the file of a delivered message from ``free/`` when there is one
(``Spool.retire``; overwritten and cut to length by the reception), else a new empty file in
``spare/``: creating a file allocates an inode, which ext4 without a journal makes slow when
many were freed lately. Spares are removed at start (``Spool.recover``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
from pathlib import Path

__all__ = ["SpareFiles"]

log = logging.getLogger(__name__)

# How often an accepting process may look in an empty free/ for files to reuse.
FREE_LIST_SECONDS = 0.05


def _share_of(name: str, count: int) -> int:
    try:
        return int(name[-2:], 16) % count
    except ValueError:
        return -1  # not a queue id: nobody's


class SpareFiles:
    """The pool of one accepting process (see the module's docstring)."""

    def __init__(
        self, directory: Path, free: Path, size: int = 4, share: tuple[int, int] = (0, 1)
    ) -> None:
        self.directory = directory
        self.free = free
        self.size = size
        # (this process's number, how many): each takes its own share of free/ first, by the
        # last hex digits of the names, so that busy processes seldom race for a file.
        self.share = share
        self._ready: collections.deque[tuple[int, Path, bool]] = collections.deque()
        self._count = 0  # spare names: pid and counter, unique in spare/
        self._candidates: list[str] = []  # seen in free/; another process may take them first
        self._free_listed = 0.0

    def take(self, path: Path) -> tuple[int, bool] | None:
        """(descriptor, whether it holds an old message) of a spare file renamed to
        ``path`` (which must not exist), open for writing; None when there is none left."""
        while self._ready:
            fd, spare, reused = self._ready.popleft()
            try:
                os.rename(spare, path)
            except OSError:  # removed meanwhile: try the next one
                os.close(fd)
                continue
            return fd, reused
        return None

    def refill(self) -> None:
        while len(self._ready) < self.size:
            self._count += 1
            path = self.directory / f"{os.getpid()}-{self._count}"
            try:
                fd = self._reuse(path)
                reused = fd is not None
                if fd is None:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:  # a full disk, say: receptions create their own files
                log.debug("cannot make a spare spool file: %s", exc)
                return
            self._ready.append((fd, path, reused))

    def _reuse(self, path: Path) -> int | None:
        """A file from ``free/``, moved to ``path`` and open for writing; None if none."""
        while True:
            if not self._candidates:
                now = time.monotonic()
                if now - self._free_listed < FREE_LIST_SECONDS:
                    return None  # free/ was empty a moment ago
                self._free_listed = now
                index, count = self.share
                mine: list[str] = []
                others: list[str] = []
                for name in os.listdir(self.free):
                    (mine if _share_of(name, count) == index else others).append(name)
                # Its own share first (taken from the end); then the others' files, which a
                # lone busy process needs: otherwise free/ fills with files it may not take,
                # the scheduler deletes every file it frees and this process creates every
                # file it uses, two of the dearest system calls on ext4. A file another
                # process took first fails the rename and is skipped.
                self._candidates = others + mine
                if not self._candidates:
                    return None
            name = self._candidates.pop()
            try:
                os.rename(self.free / name, path)
            except FileNotFoundError:
                continue  # taken by another accepting process
            return os.open(path, os.O_WRONLY)

    def close(self) -> None:
        while self._ready:
            fd, path, _ = self._ready.popleft()
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
