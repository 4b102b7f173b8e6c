"""Receiving into the spool: a message's file, and the commit that must finish before the 250.

A message must be on disk, under its name in ``incoming/``, before the SMTP server may answer
250 (RFC 5321 §6.1). A reception in an accepting process writes into a file reserved in
``incoming/`` ahead of need (``relayd.spool.reserved``), whose name is durable already: its
commit marks the file complete and fsyncs it, one flush. Any other reception is written in
``tmp/``, fsync'd, renamed into ``incoming/`` and the directory fsync'd. Commits from
concurrent connections are batched by ``GroupCommitter``: N concurrent connections cost
about one directory fsync, not N.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from relayd.core.envelope import Envelope
from relayd.errors import SpoolError
from relayd.spool.fileformat import COMPLETE_MODE, head, trailer
from relayd.spool.reserved import Reserved
from relayd.spool.sealing import SegmentSealer, SpoolKey

__all__ = ["SPILL_BYTES", "GroupCommitter", "Reception", "fsync_dir"]

log = logging.getLogger(__name__)

# A commit batch slower than this moves the next ones off the event loop for a while.
SLOW_BATCH_SECONDS = 0.02
SLOW_DISK_SECONDS = 60.0
# Content up to this size is held in memory and written with one system call at commit.
SPILL_BYTES = 1 << 18


def fsync_dir(path: Path | str) -> None:
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


class Reception:
    """A message being received: write its content, then ``await commit()`` or ``abort()``.

    The file is created in ``tmp/`` at once (the queue id is reserved and a spool that cannot
    take a file fails before DATA is read), but content is kept in memory up to
    ``SPILL_BYTES`` and written with one ``writev`` by the committer: a typical message
    costs one write system call. Bigger messages spill to the file as they arrive, so memory
    stays bounded whatever the size.

    ``path``: where the file is written: its ``tmp/`` name, or, with ``reserved`` (a file
    reserved in ``incoming/``, whose queue id the envelope carries), its final name;
    ``key``: seals the envelope and the content when it seals new files.
    """

    def __init__(
        self,
        envelope: Envelope,
        path: Path,
        committer: GroupCommitter,
        *,
        key: SpoolKey | None = None,
        reserved: Reserved | None = None,
    ) -> None:
        self.envelope = envelope
        self.queue_id = envelope.queue_id
        self.path = path
        self.committer = committer
        self.length = 0
        # Durable under its name in incoming/: the spool's from then on, never undone here.
        self.committed = False
        # Written where it will stay: committing it is marking it complete, no rename.
        self.in_place = reserved is not None
        # A reused file still holds an old message: it is overwritten from its start and cut
        # to this one's length before it is synced, so no byte of the old one survives.
        self._reused = reserved is not None and reserved.reused
        self._written = 0
        if reserved is not None:
            fd = reserved.fd
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, COMPLETE_MODE)
        # Unbuffered: the buffering is ``_pending``, written with writev.
        self._file: BinaryIO | None = os.fdopen(fd, "wb", buffering=0)
        header = envelope.to_json()
        self._sealer: SegmentSealer | None = None
        if key is not None and key.seal_new:
            salt, cipher = key.new_file(self.queue_id)
            header = salt + cipher.seal_envelope(header)
            self._sealer = cipher.sealer()
        self._pending: list[bytes] = [head(header, sealed=self._sealer is not None)]
        self._pending_size = len(self._pending[0])
        self._stored = 0  # content bytes as they go to the file (sealed, when sealing)

    @property
    def is_open(self) -> bool:
        """Still being written: neither committed nor aborted."""
        return self._file is not None

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

    def finish_file(self, *, sync: bool = True) -> None:
        """Write what is pending and the trailer, mark the file complete, fsync (unless told
        not to) and close."""
        assert self._file is not None
        fd = self._file.fileno()
        if self._sealer is not None:
            self._store(self._sealer.finish())
        end = trailer(self._stored)
        self._pending.append(end)
        self._pending_size += len(end)
        self._spill()
        if self._reused:
            os.ftruncate(fd, self._written)
        if self.in_place:
            # The mode is in the inode, which this fsync writes with the data: after a crash
            # the file is a whole message, or still marked reserved and removed at start.
            os.fchmod(fd, COMPLETE_MODE)
        if sync:
            os.fsync(fd)
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
        return self.committer.submit(self, on_durable)

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

    def commit_into(self, directory: Path, *, fsync: bool = True) -> None:
        """Blocking: make the message durable in ``directory`` (a queue other than
        ``incoming/``, such as ``copy/`` for a DSN); aborted on failure. For relayd's own
        small messages, from a worker thread."""
        assert not self.in_place, "a reserved file is committed where it is"
        try:
            self.finish_file(sync=fsync)
            os.rename(self.path, directory / self.queue_id)
            if fsync:
                fsync_dir(directory)
        except BaseException:
            self.abort()
            raise
        self.committed = True

    def abort(self) -> None:
        if self.committed:
            return  # durable and acknowledged, or about to be: the spool's now
        self._pending = []
        self._pending_size = 0
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        # (A reserved file is given up with it: a new one is reserved at the next refill.)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class GroupCommitter:
    """Batches the fsyncs of receptions that finish at about the same time.

    While one batch is being synced, new commits queue up; the next batch takes them all. No
    reception is acknowledged before its own file and the directory entry are durable.

    Where the batch is synced: in a worker thread by default. With ``in_loop`` (the
    accepting processes, which do nothing else) it is synced on the event loop itself while
    the disk is fast: handing a batch to a thread and back costs more CPU than a fast fsync
    takes (futex wake-ups, GIL hand-overs; measured: a quarter of an accepting process's
    time per message). A batch that takes longer than ``SLOW_BATCH_SECONDS`` sends the next
    ones to the thread for ``SLOW_DISK_SECONDS``, so a slow disk never stalls every session.

    ``after_batch`` runs once a batch's sessions have been woken (reserving new files).
    """

    def __init__(
        self,
        incoming: Path,
        *,
        fsync: bool = True,
        in_loop: bool = False,
        after_batch: Callable[[], None] | None = None,
    ) -> None:
        self.incoming = incoming
        self.fsync = fsync
        self.in_loop = in_loop
        self.after_batch = after_batch
        self._prefix = f"{incoming}/"
        self._pending: list[tuple[Reception, asyncio.Future[None], Callable[[], None] | None]] = []
        self._running = False
        self._drainer: asyncio.Task[None] | None = None  # referenced while it runs
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
                # reserved files (a directory fsync) come after.
                for (_, _, on_durable), result in zip(batch, results, strict=True):
                    if result is None and on_durable is not None:
                        loop.call_soon(on_durable)
                if self.after_batch is not None:
                    loop.call_soon(self.after_batch)
        finally:
            self._running = False

    def _sync_batch(self, receptions: list[Reception]) -> list[Exception | None]:
        results: list[Exception | None] = []
        renamed: list[Reception] = []  # committed through tmp/: their names need a dir fsync
        for reception in receptions:
            if not reception.is_open:
                results.append(SpoolError(f"{reception.queue_id}: reception was aborted"))
                continue
            try:
                reception.finish_file(sync=self.fsync)
                if reception.in_place:
                    reception.committed = True  # its name was durable already
                else:
                    os.rename(reception.path, self._prefix + reception.queue_id)
                    renamed.append(reception)
                results.append(None)
            except OSError as exc:
                reception.abort()
                results.append(SpoolError(f"{reception.queue_id}: cannot commit: {exc.strerror}"))
        if renamed and self.fsync:
            try:
                self._fsync_incoming()
            except OSError as exc:
                # Not durable, so not accepted: take the files back out before the clients
                # hear 452, or a message they will resend would also go out from here.
                for reception in renamed:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._prefix + reception.queue_id)
                err = SpoolError(f"cannot sync spool directory: {exc.strerror}")
                failed = {id(r) for r in renamed}
                return [
                    err if id(reception) in failed else result
                    for reception, result in zip(receptions, results, strict=True)
                ]
        for reception in renamed:
            reception.committed = True
        return results

    def _fsync_incoming(self) -> None:
        if not self.in_loop:
            fsync_dir(self.incoming)
            return
        # A process that commits all day keeps the directory open (two system calls fewer
        # per batch); it is never closed before the process ends.
        if self._incoming_fd is None:
            self._incoming_fd = os.open(self.incoming, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(self._incoming_fd)
