"""Receiving into the spool: a message's file in ``tmp/``, then the group commit into
``incoming/`` (file fsync, rename, directory fsync) that must finish before the 250.

Commits from concurrent connections are batched by ``GroupCommitter``; an accepting process
also keeps a few ``SpareFiles`` created ahead, so that creating a file (an inode allocation,
slow on a busy file system) is not in the time a client waits for its 250.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from relayd.core.envelope import Envelope
from relayd.errors import SpoolError
from relayd.spool.sealing import SegmentSealer

if TYPE_CHECKING:
    from relayd.spool.store import Spool

__all__ = [
    "MAGIC",
    "SEALED_MAGIC",
    "SPILL_BYTES",
    "GroupCommitter",
    "Reception",
    "SpareFiles",
    "fsync_dir",
    "trailer",
]

log = logging.getLogger(__name__)

MAGIC = b"RELAYD1 "
# A file sealed with spool.key (relayd.spool.sealing): the header is the salt and the sealed
# envelope, the content is sealed segments, the trailer counts the bytes as stored.
SEALED_MAGIC = b"RELAYD1S "
TRAILER_PREFIX = b"\r\nRELAYD-END "
TRAILER_LEN = len(TRAILER_PREFIX) + 16 + 2  # 16 hex digits of content length + CRLF

# How often an accepting process may look in an empty free/ for files to reuse.
FREE_LIST_SECONDS = 0.05
# A commit batch slower than this moves the next ones off the event loop for a while.
SLOW_BATCH_SECONDS = 0.02
SLOW_DISK_SECONDS = 60.0
# Content up to this size is held in memory and written with one system call at commit.
SPILL_BYTES = 1 << 18


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, chunks: list[bytes]) -> None:
    """``writev`` until everything is written (a regular file may take less than asked)."""
    views = [memoryview(c) for c in chunks if c]
    while views:
        written = os.writev(fd, views[:1024])  # IOV_MAX
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def trailer(length: int) -> bytes:
    return TRAILER_PREFIX + f"{length:016X}".encode() + b"\r\n"


class Reception:
    """A message being received: write its content, then ``await commit()`` or ``abort()``.

    The file is created in ``tmp/`` at once (the queue id is reserved and a spool that cannot
    take a file fails before DATA is read), but content is kept in memory up to
    ``SPILL_BYTES`` and written with one ``writev`` by the committer's thread: a typical
    message costs one write system call, made off the event loop. Bigger messages spill to
    the file as they arrive, so memory stays bounded whatever the size.
    """

    def __init__(self, spool: Spool, envelope: Envelope) -> None:
        self.spool = spool
        self.envelope = envelope
        self.queue_id = envelope.queue_id
        self.length = 0
        self._file: BinaryIO | None = None
        self.tmp_path = spool.root / "tmp" / self.queue_id
        spare = spool.spares.take(self.tmp_path) if spool.spares is not None else None
        # A reused file still holds an old message: it is overwritten from its start and cut
        # to this one's length before it is synced, so no byte of the old one survives.
        self._reused = spare is not None and spare[1]
        self._written = 0
        if spare is not None:
            fd = spare[0]
        else:
            fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        # Unbuffered: the buffering is ``_pending``, written with writev.
        self._file = os.fdopen(fd, "wb", buffering=0)
        header = envelope.to_json()
        magic = MAGIC
        self._sealer: SegmentSealer | None = None
        key = spool.key
        if key is not None and key.seal_new:
            salt, cipher = key.new_file(self.queue_id)
            header = salt + cipher.seal_envelope(header)
            self._sealer = cipher.sealer()
            magic = SEALED_MAGIC
        self._pending: list[bytes] = [
            magic + f"{len(header)}".encode() + b"\r\n" + header + b"\r\n"
        ]
        self._pending_size = len(self._pending[0])
        self._stored = 0  # content bytes as they go to the file (sealed, when sealing)

    def write(self, chunk: bytes) -> None:
        """Append content; an OSError here (disk full) means the caller must abort."""
        assert self._file is not None, "reception already finished"
        if not chunk:
            return
        self.length += len(chunk)
        if self._sealer is None:
            self._store(chunk)
            return
        for sealed in self._sealer.feed(chunk):
            self._store(sealed)

    def _store(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self._pending_size += len(chunk)
        self._stored += len(chunk)
        if self._pending_size >= SPILL_BYTES:
            self._spill()

    def _spill(self) -> None:
        assert self._file is not None
        _write_all(self._file.fileno(), self._pending)
        self._written += self._pending_size
        self._pending = []
        self._pending_size = 0

    def finish_file(self) -> None:
        """Write what is pending and the trailer, fsync and close; called from the
        committer's thread."""
        self.close_file(sync=True)

    def close_file(self, *, sync: bool) -> None:
        assert self._file is not None
        if self._sealer is not None:
            self._store(self._sealer.finish())
        end = trailer(self._stored)
        self._pending.append(end)
        self._pending_size += len(end)
        self._spill()
        if self._reused:
            os.ftruncate(self._file.fileno(), self._written)
        if sync:
            os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def submit(self, on_durable: Callable[[], None] | None = None) -> asyncio.Future[None]:
        """Hand the reception to the group commit; the future is done once the file and its
        directory entry in ``incoming/`` are durable, or fails with SpoolError.

        From here on the reception belongs to the committer: cancelling the future (a client
        hanging up while its fsync runs) does not withdraw it. The message then lands in
        incoming/ without a 250 having been sent: at worst a duplicate when the client
        retries (at-least-once, RFC 5321 §6.1), never a loss. ``on_durable`` runs after the
        waiting sessions have had their turn, so whatever it does (a log line, telling the
        scheduler) is not in the time a client waits for its 250.
        """
        return self.spool.committer.submit(self, on_durable)

    async def commit(self) -> str:
        """Make the message durable in ``incoming/``; returns the queue id. Raises SpoolError."""
        try:
            await asyncio.shield(self.submit())
        except asyncio.CancelledError:
            raise
        except BaseException:
            self.abort()
            raise
        return self.queue_id

    def abort(self) -> None:
        self._pending = []
        self._pending_size = 0
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            self.tmp_path.unlink()


class GroupCommitter:
    """Batches the fsyncs of receptions that finish at about the same time.

    While one batch is being synced, new commits queue up; the next batch takes them all, so
    N concurrent connections cost about one directory fsync, not N. No reception is
    acknowledged before its own file and the directory entry are durable.

    Where the batch is synced: in a worker thread by default. With ``in_loop`` (the
    accepting processes, which do nothing else) it is synced on the event loop itself while
    the disk is fast: handing a batch to a thread and back costs more CPU than a fast fsync
    takes (futex wake-ups, GIL hand-overs; measured: a quarter of an accepting process's
    time per message). A batch that takes longer than ``SLOW_BATCH_SECONDS`` sends the next
    ones to the thread for ``SLOW_DISK_SECONDS``, so a slow disk never stalls every session.
    """

    def __init__(self, spool: Spool, *, in_loop: bool = False) -> None:
        self.spool = spool
        self.in_loop = in_loop
        self._pending: list[tuple[Reception, asyncio.Future[None], Callable[[], None] | None]] = []
        self._running = False
        self._drainer: asyncio.Task[None] | None = None
        self._threaded_until = 0.0  # monotonic time; the disk was slow: use the thread
        self._incoming_fd: int | None = None

    def submit(
        self, reception: Reception, on_durable: Callable[[], None] | None = None
    ) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append((reception, done, on_durable))
        if not self._running:
            self._running = True
            self._drainer = loop.create_task(self._drain())
        return done

    async def commit(self, reception: Reception) -> None:
        await self.submit(reception)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                in_loop = self.in_loop and time.monotonic() >= self._threaded_until
                if in_loop:
                    # One more turn of the loop lets the sessions that are about to commit
                    # join this batch (in a thread, they queue up while it syncs).
                    await asyncio.sleep(0)
                batch, self._pending = self._pending, []
                receptions = [r for r, _, _ in batch]
                started = time.monotonic()
                try:
                    if in_loop:
                        results = self._sync_batch(receptions)
                    else:
                        results = await asyncio.to_thread(self._sync_batch, receptions)
                except Exception as exc:  # a broken thread pool: fail the whole batch
                    for reception in receptions:
                        reception.abort()
                    results = [exc] * len(batch)
                if self.in_loop and time.monotonic() - started > SLOW_BATCH_SECONDS:
                    self._threaded_until = time.monotonic() + SLOW_DISK_SECONDS
                    log.info(
                        "a spool commit of %d messages took %.0f ms: committing in a thread "
                        "for the next %.0f s",
                        len(batch),
                        (time.monotonic() - started) * 1000,
                        SLOW_DISK_SECONDS,
                    )
                for (_, fut, _), result in zip(batch, results, strict=True):
                    if fut.done():  # its session was cancelled; the message is queued anyway
                        continue
                    if result is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(result)
                # Scheduled after the wake-ups of the waiting sessions, which run first and
                # write their replies before any of this: log lines, announcements and new
                # spare files (a file creation can take longer than the fsync) come after.
                for (_, _, on_durable), result in zip(batch, results, strict=True):
                    if result is None and on_durable is not None:
                        loop.call_soon(on_durable)
                if self.spool.spares is not None:
                    loop.call_soon(self.spool.spares.refill)
        finally:
            self._running = False

    def _sync_batch(self, receptions: list[Reception]) -> list[Exception | None]:
        results: list[Exception | None] = []
        incoming = f"{self.spool.root}/incoming/"
        moved: list[str] = []
        for reception in receptions:
            if reception._file is None:
                results.append(SpoolError(f"{reception.queue_id}: reception was aborted"))
                continue
            try:
                if self.spool.fsync:
                    reception.finish_file()
                else:
                    reception.close_file(sync=False)
                os.rename(reception.tmp_path, incoming + reception.queue_id)
                moved.append(reception.queue_id)
                results.append(None)
            except OSError as exc:
                reception.abort()
                results.append(SpoolError(f"{reception.queue_id}: cannot commit: {exc.strerror}"))
        if moved and self.spool.fsync:
            try:
                self._fsync_incoming()
            except OSError as exc:
                # Not durable, so not accepted: take the files back out before the clients
                # hear 452, or a message they will resend would also go out from here.
                for queue_id in moved:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(incoming + queue_id)
                err = SpoolError(f"cannot sync spool directory: {exc.strerror}")
                results = [err if r is None else r for r in results]
        return results

    def _fsync_incoming(self) -> None:
        if not self.in_loop:
            fsync_dir(self.spool.root / "incoming")
            return
        # A process that commits all day keeps the directory open (two system calls fewer
        # per batch); it is never closed before the process ends.
        if self._incoming_fd is None:
            self._incoming_fd = os.open(self.spool.root / "incoming", os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(self._incoming_fd)


def _share_of(name: str, count: int) -> int:
    try:
        return int(name[-2:], 16) % count
    except ValueError:
        return -1  # not a queue id: nobody's


class SpareFiles:
    """Files ready ahead of need for the receptions of an accepting process.

    A reception renames a spare to its ``tmp/`` name (a rename allocates nothing), and the
    pool is refilled after the commit batch has answered its clients, so no client waits
    for a file. A spare is the file of a delivered message from ``free/`` when there is one
    (``Spool.retire``; overwritten and cut to length by the reception), else a new empty
    file in ``spare/``: creating a file allocates an inode, which ext4 without a journal
    makes slow when many were freed lately. Spares are removed at start
    (``Spool.recover``).
    """

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
