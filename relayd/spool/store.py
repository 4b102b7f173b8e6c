"""The durable spool: one file per message, its state is the queue (directory) it lives in.

Layout under ``<state_directory>/spool`` (directories 0700, files 0600)::

    tmp/        receptions in progress; removed at start, never delivered
    incoming/   accepted and durable, waiting for the scheduler; also files reserved for
                receptions in progress (mode 0200, relayd.spool.reserved), which are not
                messages yet: passed over by every listing, removed at start
    active/     being delivered; put back into incoming/ at start
    deferred/   waiting for their next attempt
    hold/       kept and not attempted: paused account, or held by the operator
    copy/       delivered (or relayd's own DSNs), waiting only to be filed over IMAP: never
                sent upstream again (relayd.sync)
    corrupt/    quarantined: truncated or unreadable, never sent
    state/      <id>.json, the delivery state after an attempt (absent = never tried)
    free/       files of delivered messages, to be overwritten by new receptions rather
                than deleted (see ``retire``); not a queue: nothing in it is ever sent,
                and it is emptied at start

The queues and the moves allowed between them are ``relayd.core.queues``; the file format is
``relayd.spool.fileformat``; receiving is ``relayd.spool.reception``. With
``spool.encrypt_at_rest`` envelopes, contents and delivery states are sealed
(``relayd.spool.sealing``); plain and sealed files are read side by side. Names are unique
across processes (time + random), and every state change is a rename, so several processes
can share one spool.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from relayd.core.envelope import DeliveryState, Envelope
from relayd.core.queues import Queue, check_move
from relayd.core.sentcopy import awaits_filing
from relayd.errors import SpoolError
from relayd.spool.fileformat import is_complete
from relayd.spool.message import InProgress, StoredMessage, read_message
from relayd.spool.reception import GroupCommitter, Reception, fsync_dir
from relayd.spool.reserved import ReservedFiles
from relayd.spool.sealing import SEALED_STATE, FileCipher, SpoolKey

__all__ = ["RecoveryReport", "Spool", "StoredMessage", "new_queue_id"]

log = logging.getLogger(__name__)

TMP = "tmp"
STATE = "state"
SPARE = "spare"  # where earlier versions made files ahead of need; emptied at start
FREE = "free"
# At most this many delivered files wait in free/ to be reused.
FREE_FILES = 512


def new_queue_id() -> str:
    """Sortable by arrival, unique across processes sharing the spool (the random part
    needs no secrecy, and ``random`` is reseeded in every forked process)."""
    return f"{time.time_ns() // 1000:014X}{random.getrandbits(24):06X}"


@dataclass
class RecoveryReport:
    removed_temp: int = 0
    requeued_active: int = 0
    quarantined: int = 0
    queued: int = 0


class Spool:
    def __init__(
        self,
        state_directory: Path,
        *,
        fsync: bool = True,
        commit_in_loop: bool = False,
        reserved_files: int = 0,
        reuse_files: bool = False,
        share: tuple[int, int] = (0, 1),
        key: SpoolKey | None = None,
    ) -> None:
        """``commit_in_loop`` and ``reserved_files``: for a process that only receives (see
        ``GroupCommitter`` and ``ReservedFiles``); ``reuse_files``: ``retire`` keeps files
        for such processes to reuse; ``key``: ``spool.key``, which opens sealed files and,
        with ``encrypt_at_rest``, seals new ones."""
        self.root = state_directory / "spool"
        self.key = key
        # "<root>/<queue>/" as text: the hot paths join names without pathlib.
        self._dirs = {queue: f"{self.root}/{queue.value}/" for queue in Queue}
        self._state_dir = f"{self.root}/{STATE}/"
        self._free_dir = f"{self.root}/{FREE}/"
        self.reuse_files = reuse_files
        self._free_estimate = 0  # files in free/, counted again now and then (see retire)
        self._retired = 0
        self.fsync = fsync
        self.reserved = (
            ReservedFiles(
                self.root / Queue.INCOMING.value,
                self.root / FREE,
                new_queue_id,
                size=reserved_files,
                share=share,
                fsync=fsync,
            )
            if reserved_files
            else None
        )
        self.committer = GroupCommitter(
            self.root / Queue.INCOMING.value,
            fsync=fsync,
            in_loop=commit_in_loop,
            after_batch=self.reserved.refill if self.reserved is not None else None,
        )

    def directory(self, queue: Queue) -> Path:
        return self.root / queue.value

    # -- set-up and recovery ------------------------------------------------------------

    def prepare(self) -> None:
        old_umask = os.umask(0o077)
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for name in (TMP, *(q.value for q in Queue), STATE, SPARE, FREE):
                (self.root / name).mkdir(mode=0o700, exist_ok=True)
        finally:
            os.umask(old_umask)

    def recover(self, *, check_files: bool = True) -> RecoveryReport:
        """At start, before accepting: no reception is in progress, no delivery runs.

        With ``check_files`` false only names are looked at (and the delivery state of what
        was in ``active/``): a big spool is ready in a fraction of a second, and whoever
        reads a file first (the scheduler's intake, or the attempt) quarantines it if it
        is damaged, so a truncated file is still never sent.
        """
        self.prepare()
        report = RecoveryReport()
        for path in (self.root / TMP).iterdir():
            # A reception that never got its 250: the client was not told it was accepted.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                report.removed_temp += 1
        with os.scandir(self.directory(Queue.INCOMING)) as found:
            for entry in found:
                # Reserved for a reception that never finished (or never started).
                with contextlib.suppress(FileNotFoundError):
                    if not is_complete(entry.stat(follow_symlinks=False).st_mode):
                        os.unlink(entry.path)
                        report.removed_temp += 1
        for directory in (SPARE, FREE):
            for name in os.listdir(self.root / directory):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.root / directory / name)
        for name in os.listdir(self.directory(Queue.ACTIVE)):
            if awaits_filing(self.read_state(name)):
                # Delivered; the crash came before it reached copy/. Only its filing is left.
                self.move(name, Queue.ACTIVE, Queue.COPY)
                continue
            # Interrupted mid-delivery: at-least-once, so it goes out again.
            self.move(name, Queue.ACTIVE, Queue.INCOMING)
            report.requeued_active += 1
        live: set[str] = set()
        for queue in (Queue.INCOMING, Queue.DEFERRED, Queue.HOLD, Queue.COPY):
            for name in os.listdir(self.directory(queue)):
                if check_files:
                    try:
                        self.load(name, queue)
                    except SpoolError as exc:
                        self.quarantine(name, queue, str(exc))
                        report.quarantined += 1
                        continue
                live.add(name)
        report.queued = len(live)
        live.update(os.listdir(self.directory(Queue.CORRUPT)))
        for name in os.listdir(self.root / STATE):
            if name.endswith(".tmp") or name.removesuffix(".json") not in live:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.root / STATE / name)
        if self.fsync:
            for queue in (Queue.INCOMING, Queue.COPY, Queue.CORRUPT):
                fsync_dir(self.directory(queue))
            fsync_dir(self.root / STATE)
        return report

    def quarantine(self, queue_id: str, queue: Queue, reason: str) -> bool:
        """Move a damaged file to ``corrupt/``, never to be sent; False if it is gone."""
        log.error("quarantined %s: %s", queue_id, reason, extra={"queue_id": queue_id})
        try:
            self.move(queue_id, queue, Queue.CORRUPT)
        except FileNotFoundError:
            return False
        return True

    # -- receiving ----------------------------------------------------------------------

    def receive(self, envelope: Envelope) -> Reception:
        """A reception for ``envelope``: into a reserved file when this process has one
        (the reception's envelope then carries that file's queue id), else a new one."""
        reserved = self.reserved.take() if self.reserved is not None else None
        try:
            if reserved is not None:
                envelope = dataclasses.replace(envelope, queue_id=reserved.queue_id)
                path = self.directory(Queue.INCOMING) / reserved.queue_id
                return Reception(envelope, path, self.committer, key=self.key, reserved=reserved)
            path = self.root / TMP / envelope.queue_id
            return Reception(envelope, path, self.committer, key=self.key)
        except OSError as exc:
            raise SpoolError(f"cannot create spool file: {exc.strerror}") from exc

    # -- reading and moving -------------------------------------------------------------

    def _complete_in_incoming(self) -> list[str]:
        names = []
        with os.scandir(self.directory(Queue.INCOMING)) as found:
            for entry in found:
                with contextlib.suppress(FileNotFoundError):
                    if is_complete(entry.stat(follow_symlinks=False).st_mode):
                        names.append(entry.name)
        return names

    def list(self, queue: Queue) -> list[str]:
        """The messages in ``queue``, oldest first (reserved files are not messages)."""
        if queue is not Queue.INCOMING:
            return sorted(os.listdir(self.directory(queue)))
        return sorted(self._complete_in_incoming())

    def is_message(self, queue_id: str, queue: Queue) -> bool:
        """Whether ``queue`` holds ``queue_id`` as a message (not a reserved file)."""
        try:
            return is_complete(os.stat(self._dirs[queue] + queue_id).st_mode)
        except FileNotFoundError:
            return False

    def locate(self, queue_id: str) -> Queue | None:
        for queue in Queue:
            if self.is_message(queue_id, queue):
                return queue
        return None

    def load(self, queue_id: str, queue: Queue, *, preload: int = 0) -> StoredMessage:
        """The envelope and where the content is; raises SpoolError if the file is damaged
        or missing, ``InProgress`` if it is reserved for a reception not finished yet. A file
        of at most ``preload`` bytes is read whole, content included."""
        try:
            return self._read(queue_id, queue, preload)
        except InProgress:
            raise  # not a message yet: never to be quarantined
        except FileNotFoundError:
            raise SpoolError(f"unreadable: no such file: {queue_id}") from None

    def load_if_present(
        self, queue_id: str, queue: Queue, *, preload: int = 0
    ) -> StoredMessage | None:
        """Like ``load``, but None when the file is not there (moved or removed meanwhile)."""
        try:
            return self._read(queue_id, queue, preload)
        except FileNotFoundError:
            return None

    def _read(self, queue_id: str, queue: Queue, preload: int) -> StoredMessage:
        return read_message(
            self._dirs[queue] + queue_id, queue, preload=preload, cipher_for=self._file_cipher
        )

    def _file_cipher(self, queue_id: str, salt: bytes) -> FileCipher:
        if self.key is None:
            raise SpoolError(
                "sealed with a spool.key, and none is configured: set spool.key again "
                "(files stay sealed after encrypt_at_rest is turned off)"
            )
        return self.key.for_file(salt, queue_id)

    def relocated(self, msg: StoredMessage, queue: Queue) -> StoredMessage:
        """``msg`` as it is after a move to ``queue`` (its content is read from there)."""
        return dataclasses.replace(msg, queue=queue, path=self.directory(queue) / msg.queue_id)

    def move(self, queue_id: str, source: Queue, target: Queue) -> None:
        """Rename a message from one queue to another, if the table of moves allows it
        (``relayd.core.queues``); FileNotFoundError if it is not in ``source``."""
        check_move(source, target)
        os.rename(self._dirs[source] + queue_id, self._dirs[target] + queue_id)

    def remove(self, queue_id: str, queue: Queue, *, has_state: bool = True) -> None:
        """Delete a message and its delivery state (``has_state=False``: known to have none,
        which saves a system call per delivered message)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._dirs[queue] + queue_id)
        if has_state:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self._state_dir}{queue_id}.json")

    def retire(self, queue_id: str, queue: Queue, *, has_state: bool = True) -> None:
        """Like ``remove``, for a message that is done; but with ``reuse_files``, while
        ``free/`` holds fewer than ``FREE_FILES`` files, its file goes there, to be
        overwritten by a reception in an accepting process (``ReservedFiles``) instead of
        being deleted.

        Deleting a file and creating the next one costs an inode freed and an inode
        allocated; ext4 without a journal scans past every inode freed in the last minutes
        at each allocation, which at hundreds of messages a second made file creation the
        dearest system call of a reception (measured: over a quarter of an accepting
        process's time). A reused file allocates nothing.
        """
        if not self.reuse_files:
            self.remove(queue_id, queue, has_state=has_state)
            return
        if self._retired % 64 == 0:
            with contextlib.suppress(OSError):
                self._free_estimate = len(os.listdir(self._free_dir))
        self._retired += 1
        if self._free_estimate >= FREE_FILES:
            self.remove(queue_id, queue, has_state=has_state)
            return
        with contextlib.suppress(FileNotFoundError):
            os.rename(self._dirs[queue] + queue_id, self._free_dir + queue_id)
            self._free_estimate += 1
        if has_state:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self._state_dir}{queue_id}.json")

    # -- delivery state -----------------------------------------------------------------

    def read_state(self, queue_id: str) -> DeliveryState:
        try:
            with open(f"{self._state_dir}{queue_id}.json", "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return DeliveryState()
        try:
            if raw.startswith(SEALED_STATE):
                if self.key is None:
                    raise SpoolError("sealed with a spool.key, and none is configured")
                raw = self.key.open_state(queue_id, raw)
            return DeliveryState.from_json(raw)
        except (ValueError, TypeError, SpoolError) as exc:
            log.error("%s: delivery state unreadable (%s); starting afresh", queue_id, exc)
            return DeliveryState()

    def write_state(self, queue_id: str, state: DeliveryState) -> None:
        """Atomic replace: a crash leaves the old state or the new, never half of one."""
        path = f"{self._state_dir}{queue_id}.json"
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            data = state.to_json()
            if self.key is not None and self.key.seal_new:
                data = self.key.seal_state(queue_id, data)
            os.write(fd, data)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)

    def state_path(self, queue_id: str) -> Path:
        return self.root / STATE / f"{queue_id}.json"

    def counts(self) -> dict[Queue, int]:
        return {
            queue: len(
                self._complete_in_incoming()
                if queue is Queue.INCOMING
                else os.listdir(self._dirs[queue])
            )
            for queue in Queue
        }
