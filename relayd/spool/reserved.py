"""Files reserved in ``incoming/`` ahead of need, for the receptions of an accepting process.

A message is durable once its file is on disk *and* its name is in ``incoming/``: two writes
that two fsyncs make durable, the file's and the directory's. An accepting process makes the
second one before the message exists: it reserves files in ``incoming/`` under queue ids of
their own, marked *reserved* (mode 0200: nobody reads them, ``relayd.spool.fileformat``), and
fsyncs the directory once for a whole refill. A reception then writes into a reserved file,
marks it complete (0600) and fsyncs that one file before the 250: the name it needs is
already durable. This is how Postfix's cleanup works (its queue files are created in
``incoming/`` and become complete when their mode says so), and it halves the disk
flushes a client waits for.

A reserved file is the file of a delivered message from ``free/`` when there is one
(``Spool.retire``; overwritten and cut to length by the reception), else a new one: creating
a file allocates an inode, which ext4 without a journal makes slow when many were freed
lately. Reserved files that were never used are removed when the process stops, and those
left by a crash at the next start (``Spool.recover``); whoever lists ``incoming/`` passes
them over.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relayd.spool.fileformat import RESERVED_MODE

__all__ = ["Reserved", "ReservedFiles"]

log = logging.getLogger(__name__)

# How often an accepting process may look in an empty free/ for files to reuse.
FREE_LIST_SECONDS = 0.05


def _share_of(name: str, count: int) -> int:
    try:
        return int(name[-2:], 16) % count
    except ValueError:
        return -1  # not a queue id: nobody's


@dataclass(frozen=True)
class Reserved:
    """A reserved file, open for writing: its queue id is the message's."""

    fd: int
    queue_id: str
    reused: bool  # it still holds an old message, to be overwritten and cut to length


class ReservedFiles:
    """The pool of one accepting process.

    ``new_queue_id`` names each file; ``refill`` tops the pool up once it is down to half,
    so the directory is synced once per several messages, after their clients had their 250.
    """

    def __init__(
        self,
        incoming: Path,
        free: Path,
        new_queue_id: Callable[[], str],
        *,
        size: int = 8,
        share: tuple[int, int] = (0, 1),
        fsync: bool = True,
    ) -> None:
        self.incoming = incoming
        self.free = free
        self.new_queue_id = new_queue_id
        self.size = size
        # (this process's number, how many): each takes its own share of free/ first, by the
        # last hex digits of the names, so that busy processes seldom race for a file.
        self.share = share
        self.fsync = fsync
        self._ready: collections.deque[Reserved] = collections.deque()
        self._candidates: list[str] = []  # seen in free/; another process may take them first
        self._free_listed = 0.0
        self._incoming_fd: int | None = None

    def __len__(self) -> int:
        return len(self._ready)

    def take(self) -> Reserved | None:
        """A reserved file for a reception; None when there is none left (the reception
        then makes its own file)."""
        return self._ready.popleft() if self._ready else None

    def refill(self, *, at_least: int | None = None) -> None:
        """Reserve files until the pool is full again, once it holds ``at_least`` or fewer
        (default: half); the new names are durable when this returns."""
        threshold = self.size // 2 if at_least is None else at_least
        if len(self._ready) > threshold:
            return
        made: list[Reserved] = []
        while len(self._ready) + len(made) < self.size:
            queue_id = self.new_queue_id()
            path = self.incoming / queue_id
            try:
                reserved = self._reuse(path, queue_id)
                if reserved is None:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, RESERVED_MODE)
                    reserved = Reserved(fd, queue_id, reused=False)
            except OSError as exc:  # a full disk, say: receptions make their own files
                log.debug("cannot reserve a spool file: %s", exc)
                break
            made.append(reserved)
        if not made:
            return
        if self.fsync:
            try:
                self._sync_incoming()
            except OSError as exc:
                # Names that may not survive a crash are no use: give them back.
                log.warning("cannot sync the spool's incoming/: %s", exc.strerror or exc)
                for reserved in made:
                    self._discard(reserved)
                return
        self._ready.extend(made)

    def _sync_incoming(self) -> None:
        # The process reserves files all day: the directory stays open (two system calls
        # fewer per refill); it is closed with the pool.
        if self._incoming_fd is None:
            self._incoming_fd = os.open(self.incoming, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(self._incoming_fd)

    def _reuse(self, path: Path, queue_id: str) -> Reserved | None:
        """A file from ``free/``, marked reserved and moved to ``path``; None if none."""
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
                # process took first fails and is skipped.
                self._candidates = others + mine
                if not self._candidates:
                    return None
            source = self.free / self._candidates.pop()
            try:
                # Marked before it is moved: in incoming/ it is never taken for a message.
                os.chmod(source, RESERVED_MODE)
                os.rename(source, path)
            except FileNotFoundError:
                continue  # taken by another accepting process
            return Reserved(os.open(path, os.O_WRONLY), queue_id, reused=True)

    def _discard(self, reserved: Reserved) -> None:
        os.close(reserved.fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.incoming / reserved.queue_id)

    def close(self) -> None:
        """Give back every file not used (at stop)."""
        while self._ready:
            self._discard(self._ready.popleft())
        if self._incoming_fd is not None:
            os.close(self._incoming_fd)
            self._incoming_fd = None
