"""The durable spool: one file per message, its state is the directory it lives in.

Layout under ``<state_directory>/spool`` (directories 0700, files 0600)::

    tmp/        receptions in progress; removed at start, never delivered
    incoming/   accepted and durable, waiting for the scheduler
    active/     being delivered; put back into incoming/ at start
    deferred/   waiting for their next attempt
    hold/       kept and not attempted: paused account, or held by the operator
    copy/       delivered (or relayd's own DSNs), waiting only to be filed over IMAP: never
                sent upstream again (relayd.sync)
    corrupt/    quarantined at start: truncated or unreadable, never sent
    state/      <id>.json, the delivery state after an attempt (absent = never tried)

A message file is ``header line, envelope JSON, content, trailer``; the trailer records the
content length, so a file cut short by a crash is recognised and quarantined rather than sent
(Postfix discards queue files without their end record the same way).

A reception is written to ``tmp/``, fsync'd, renamed into ``incoming/`` and the directory
fsync'd before the SMTP server may answer 250 (RFC 5321 §6.1). Commits from concurrent
connections are batched by ``GroupCommitter``: one thread fsyncs every file of the batch and
then each target directory once. Names are unique across processes (time + random), and every
state change is a rename, so several processes can share one spool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from relayd.core.envelope import DeliveryState, Envelope
from relayd.core.sentcopy import awaits_filing
from relayd.errors import SpoolError

__all__ = [
    "QUEUES",
    "GroupCommitter",
    "Reception",
    "RecoveryReport",
    "Spool",
    "StoredMessage",
    "new_queue_id",
]

log = logging.getLogger(__name__)

QUEUES = ("incoming", "active", "deferred", "hold", "corrupt", "copy")
_MAGIC = b"RELAYD1 "
_TRAILER_PREFIX = b"\r\nRELAYD-END "
_TRAILER_LEN = len(_TRAILER_PREFIX) + 16 + 2  # 16 hex digits of content length + CRLF
_WRITE_BUFFER = 1 << 16


def new_queue_id() -> str:
    """Sortable by arrival, unique across processes sharing the spool."""
    return f"{time.time_ns() // 1000:014X}{secrets.randbelow(1 << 24):06X}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _trailer(length: int) -> bytes:
    return _TRAILER_PREFIX + f"{length:016X}".encode() + b"\r\n"


@dataclass(frozen=True)
class StoredMessage:
    queue_id: str
    queue: str
    path: Path
    envelope: Envelope
    content_offset: int
    content_length: int

    def read_content(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.content_offset)
            return f.read(self.content_length)

    def iter_content(self, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            f.seek(self.content_offset)
            left = self.content_length
            while left > 0:
                chunk = f.read(min(chunk_size, left))
                if not chunk:
                    raise SpoolError(f"{self.queue_id}: message file shrank while reading")
                left -= len(chunk)
                yield chunk


@dataclass
class RecoveryReport:
    removed_temp: int = 0
    requeued_active: int = 0
    quarantined: int = 0
    queued: int = 0


class Reception:
    """A message being received: write its content, then ``await commit()`` or ``abort()``."""

    def __init__(self, spool: Spool, envelope: Envelope) -> None:
        self.spool = spool
        self.envelope = envelope
        self.queue_id = envelope.queue_id
        self.tmp_path = spool.root / "tmp" / self.queue_id
        self.length = 0
        self._file: BinaryIO | None = None
        fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            self._file = os.fdopen(fd, "wb", buffering=_WRITE_BUFFER)
            header = envelope.to_json()
            self._file.write(_MAGIC + f"{len(header)}".encode() + b"\r\n" + header + b"\r\n")
        except BaseException:
            self.abort()
            raise

    def write(self, chunk: bytes) -> None:
        """Append content; an OSError here (disk full) means the caller must abort."""
        assert self._file is not None, "reception already finished"
        self._file.write(chunk)
        self.length += len(chunk)

    def finish_file(self) -> None:
        """Write the trailer and flush; called from the committer's thread before fsync."""
        assert self._file is not None
        self._file.write(_trailer(self.length))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    async def commit(self) -> str:
        """Make the message durable in ``incoming/``; returns the queue id. Raises SpoolError."""
        # Once queued, the reception belongs to the committer's thread: a client hanging up
        # (aiosmtpd cancels its handler) must not pull the file from under it. The message
        # then lands in incoming/ without a 250 having been sent — at worst a duplicate when
        # the client retries, never a loss.
        try:
            await asyncio.shield(self.spool.committer.commit(self))
        except asyncio.CancelledError:
            raise
        except BaseException:
            self.abort()
            raise
        return self.queue_id

    def abort(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        with contextlib.suppress(FileNotFoundError):
            self.tmp_path.unlink()


class GroupCommitter:
    """Batches the fsyncs of receptions that finish at about the same time.

    While one batch is being synced in a worker thread, new commits queue up; the next batch
    takes them all, so N concurrent connections cost about one directory fsync, not N.
    No reception is acknowledged before its own file and the directory entry are durable.
    """

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._pending: list[tuple[Reception, asyncio.Future[None]]] = []
        self._running = False
        self._drainer: asyncio.Task[None] | None = None

    async def commit(self, reception: Reception) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._pending.append((reception, done))
        if not self._running:
            self._running = True
            self._drainer = loop.create_task(self._drain())
        await done

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    results = await asyncio.to_thread(self._sync_batch, [r for r, _ in batch])
                except Exception as exc:  # a broken thread pool: fail the whole batch
                    results = [exc] * len(batch)
                for (_, fut), result in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if result is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(result)
        finally:
            self._running = False

    def _sync_batch(self, receptions: list[Reception]) -> list[Exception | None]:
        results: list[Exception | None] = []
        incoming = self.spool.root / "incoming"
        moved: list[str] = []
        for reception in receptions:
            if reception._file is None:
                results.append(SpoolError(f"{reception.queue_id}: reception was aborted"))
                continue
            try:
                if self.spool.fsync:
                    reception.finish_file()
                else:
                    assert reception._file is not None
                    reception._file.write(_trailer(reception.length))
                    reception._file.close()
                    reception._file = None
                os.rename(reception.tmp_path, incoming / reception.queue_id)
                moved.append(reception.queue_id)
                results.append(None)
            except OSError as exc:
                reception.abort()
                results.append(SpoolError(f"{reception.queue_id}: cannot commit: {exc.strerror}"))
        if moved and self.spool.fsync:
            try:
                _fsync_dir(incoming)
            except OSError as exc:
                # Not durable, so not accepted: take the files back out before the clients
                # hear 452, or a message they will resend would also go out from here.
                for queue_id in moved:
                    with contextlib.suppress(FileNotFoundError):
                        (incoming / queue_id).unlink()
                err = SpoolError(f"cannot sync spool directory: {exc.strerror}")
                results = [err if r is None else r for r in results]
        return results


class Spool:
    def __init__(self, state_directory: Path, *, fsync: bool = True) -> None:
        self.root = state_directory / "spool"
        self.fsync = fsync
        self.committer = GroupCommitter(self)

    # -- set-up and recovery ------------------------------------------------------------

    def prepare(self) -> None:
        old_umask = os.umask(0o077)
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for name in ("tmp", *QUEUES, "state"):
                (self.root / name).mkdir(mode=0o700, exist_ok=True)
        finally:
            os.umask(old_umask)

    def recover(self) -> RecoveryReport:
        """At start, before accepting: no reception is in progress, no delivery runs."""
        self.prepare()
        report = RecoveryReport()
        for path in (self.root / "tmp").iterdir():
            # A reception that never got its 250: the client was not told it was accepted.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                report.removed_temp += 1
        for path in (self.root / "active").iterdir():
            if awaits_filing(self.read_state(path.name)):
                # Delivered; the crash came before it reached copy/. Only its filing is left.
                os.rename(path, self.root / "copy" / path.name)
                continue
            # Interrupted mid-delivery: at-least-once, so it goes out again.
            os.rename(path, self.root / "incoming" / path.name)
            report.requeued_active += 1
        for queue in ("incoming", "deferred", "hold", "copy"):
            for path in (self.root / queue).iterdir():
                try:
                    self._read_header(path, queue)
                except SpoolError as exc:
                    log.error("quarantined %s: %s", path.name, exc)
                    os.rename(path, self.root / "corrupt" / path.name)
                    report.quarantined += 1
                    continue
                report.queued += 1
        live = {p.name for q in QUEUES for p in (self.root / q).iterdir()}
        for path in (self.root / "state").iterdir():
            if path.name.endswith(".tmp") or path.stem not in live:
                path.unlink()
        if self.fsync:
            for name in ("incoming", "copy", "corrupt", "state"):
                _fsync_dir(self.root / name)
        return report

    # -- receiving ----------------------------------------------------------------------

    def receive(self, envelope: Envelope) -> Reception:
        try:
            return Reception(self, envelope)
        except OSError as exc:
            raise SpoolError(f"cannot create spool file: {exc.strerror}") from exc

    # -- reading and moving -------------------------------------------------------------

    def list(self, queue: str) -> list[str]:
        return sorted(p.name for p in (self.root / queue).iterdir())

    def locate(self, queue_id: str) -> str | None:
        for queue in QUEUES:
            if (self.root / queue / queue_id).exists():
                return queue
        return None

    def load(self, queue_id: str, queue: str) -> StoredMessage:
        return self._read_header(self.root / queue / queue_id, queue)

    def _read_header(self, path: Path, queue: str) -> StoredMessage:
        try:
            with open(path, "rb") as f:
                first = f.readline(64)
                if not first.startswith(_MAGIC) or not first.endswith(b"\r\n"):
                    raise SpoolError("bad header line")
                header_len = int(first[len(_MAGIC) : -2])
                header = f.read(header_len + 2)
                if len(header) != header_len + 2 or not header.endswith(b"\r\n"):
                    raise SpoolError("truncated envelope")
                envelope = Envelope.from_json(header[:-2])
                offset = len(first) + header_len + 2
                size = os.fstat(f.fileno()).st_size
                if size < offset + _TRAILER_LEN:
                    raise SpoolError("no end record")
                f.seek(size - _TRAILER_LEN)
                trailer = f.read(_TRAILER_LEN)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise SpoolError(f"unreadable: {exc}") from exc
        length = size - offset - _TRAILER_LEN
        if trailer != _trailer(length):
            raise SpoolError("end record missing or length mismatch")
        if envelope.queue_id != path.name:
            raise SpoolError("queue id does not match file name")
        return StoredMessage(path.name, queue, path, envelope, offset, length)

    def move(self, queue_id: str, source: str, target: str) -> None:
        os.rename(self.root / source / queue_id, self.root / target / queue_id)

    def remove(self, queue_id: str, queue: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / queue / queue_id).unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.root / "state" / f"{queue_id}.json").unlink()

    def read_state(self, queue_id: str) -> DeliveryState:
        try:
            raw = (self.root / "state" / f"{queue_id}.json").read_bytes()
        except FileNotFoundError:
            return DeliveryState()
        try:
            return DeliveryState.from_json(raw)
        except (ValueError, TypeError) as exc:
            log.error("%s: delivery state unreadable (%s); starting afresh", queue_id, exc)
            return DeliveryState()

    def write_state(self, queue_id: str, state: DeliveryState) -> None:
        """Atomic replace: a crash leaves the old state or the new, never half of one."""
        path = self.root / "state" / f"{queue_id}.json"
        tmp = path.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, state.to_json())
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)

    def counts(self) -> dict[str, int]:
        return {q: sum(1 for _ in (self.root / q).iterdir()) for q in QUEUES}
