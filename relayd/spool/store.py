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
    spare/      empty files made ahead of need by accepting processes; removed at start
    free/       files of delivered messages, to be overwritten by new receptions rather
                than deleted (see ``retire``); not a queue: nothing in it is ever sent,
                and it is emptied at start

A message file is ``header line, envelope JSON, content, trailer``; the trailer records the
content length, so a file cut short by a crash is recognised and quarantined rather than sent
(Postfix discards queue files without their end record the same way). With
``spool.encrypt_at_rest`` the envelope and the content are sealed (relayd.spool.sealing) and
the trailer counts the content as stored; plain and sealed files are read side by side.

A reception is written to ``tmp/``, fsync'd, renamed into ``incoming/`` and the directory
fsync'd before the SMTP server may answer 250 (RFC 5321 §6.1). Commits from concurrent
connections are batched by ``GroupCommitter``: one thread fsyncs every file of the batch and
then each target directory once. Names are unique across processes (time + random), and every
state change is a rename, so several processes can share one spool.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from relayd.core.envelope import DeliveryState, Envelope
from relayd.core.sentcopy import awaits_filing
from relayd.errors import SpoolError
from relayd.spool.reception import (
    MAGIC,
    SEALED_MAGIC,
    TRAILER_LEN,
    GroupCommitter,
    Reception,
    SpareFiles,
    fsync_dir,
    trailer,
)
from relayd.spool.sealing import (
    SALT_BYTES,
    SEALED_STATE,
    FileCipher,
    SpoolKey,
    plaintext_length,
)

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
# The on-disk format, as relayd.spool.reception writes it (the benchmark writes it too).
_MAGIC = MAGIC
SPARE = "spare"
FREE = "free"
# At most this many delivered files wait in free/ to be reused.
FREE_FILES = 512
_TRAILER_LEN = TRAILER_LEN
_trailer = trailer
_fsync_dir = fsync_dir
# The first read of a message file: enough for the envelope of nearly every message.
_HEAD_READ = 1 << 13


def new_queue_id() -> str:
    """Sortable by arrival, unique across processes sharing the spool (the random part
    needs no secrecy, and ``random`` is reseeded in every forked process)."""
    return f"{time.time_ns() // 1000:014X}{random.getrandbits(24):06X}"


@dataclass(frozen=True)
class StoredMessage:
    queue_id: str
    queue: str
    path: Path
    envelope: Envelope
    content_offset: int
    content_length: int
    # The content, when the file was small enough to be read whole with its envelope.
    preloaded: bytes | None = field(default=None, repr=False, compare=False)
    # A sealed file (relayd.spool.sealing): its key, and the content's length as stored.
    cipher: FileCipher | None = field(default=None, repr=False, compare=False)
    stored_length: int | None = None

    def read_content(self) -> bytes:
        if self.preloaded is not None:
            return self.preloaded
        with open(self.path, "rb") as f:
            f.seek(self.content_offset)
            if self.cipher is None:
                return f.read(self.content_length)
            assert self.stored_length is not None
            return self.cipher.open_all(f.read(self.stored_length))

    def iter_content(self, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        if self.preloaded is not None:
            for start in range(0, len(self.preloaded), chunk_size):
                yield self.preloaded[start : start + chunk_size]
            return
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.content_offset)
            if self.cipher is not None:
                assert self.stored_length is not None
                for segment in self.cipher.iter_open(f.read, self.stored_length):
                    for start in range(0, len(segment), chunk_size):
                        yield segment[start : start + chunk_size]
                return
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


class Spool:
    def __init__(
        self,
        state_directory: Path,
        *,
        fsync: bool = True,
        commit_in_loop: bool = False,
        spare_files: int = 0,
        reuse_files: bool = False,
        share: tuple[int, int] = (0, 1),
        key: SpoolKey | None = None,
    ) -> None:
        """``commit_in_loop`` and ``spare_files``: for a process that only receives (see
        ``GroupCommitter`` and ``SpareFiles``); ``reuse_files``: ``retire`` keeps files
        for such processes to reuse; ``key``: ``spool.key``, which opens sealed files and,
        with ``encrypt_at_rest``, seals new ones."""
        self.root = state_directory / "spool"
        self.key = key
        # "<root>/<queue>/" as text: the hot paths join names without pathlib.
        self._dirs = {name: f"{self.root}/{name}/" for name in ("tmp", *QUEUES, "state", FREE)}
        self.reuse_files = reuse_files
        self._free_estimate = 0  # files in free/, counted again now and then (see retire)
        self._retired = 0
        self.fsync = fsync
        self.committer = GroupCommitter(self, in_loop=commit_in_loop)
        self.spares = (
            SpareFiles(self.root / SPARE, self.root / FREE, spare_files, share)
            if spare_files
            else None
        )

    # -- set-up and recovery ------------------------------------------------------------

    def prepare(self) -> None:
        old_umask = os.umask(0o077)
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            for name in ("tmp", *QUEUES, "state", SPARE, FREE):
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
        for path in (self.root / "tmp").iterdir():
            # A reception that never got its 250: the client was not told it was accepted.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                report.removed_temp += 1
        for directory in (SPARE, FREE):
            for name in os.listdir(self.root / directory):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.root / directory / name)
        for path in (self.root / "active").iterdir():
            if awaits_filing(self.read_state(path.name)):
                # Delivered; the crash came before it reached copy/. Only its filing is left.
                os.rename(path, self.root / "copy" / path.name)
                continue
            # Interrupted mid-delivery: at-least-once, so it goes out again.
            os.rename(path, self.root / "incoming" / path.name)
            report.requeued_active += 1
        live: set[str] = set()
        for queue in ("incoming", "deferred", "hold", "copy"):
            for name in os.listdir(self.root / queue):
                if check_files:
                    try:
                        self._read_header(self.root / queue / name, queue)
                    except SpoolError as exc:
                        self.quarantine(name, queue, str(exc))
                        report.quarantined += 1
                        continue
                live.add(name)
        report.queued = len(live)
        live.update(os.listdir(self.root / "corrupt"))
        for name in os.listdir(self.root / "state"):
            if name.endswith(".tmp") or name.removesuffix(".json") not in live:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.root / "state" / name)
        if self.fsync:
            for name in ("incoming", "copy", "corrupt", "state"):
                _fsync_dir(self.root / name)
        return report

    def quarantine(self, queue_id: str, queue: str, reason: str) -> bool:
        """Move a damaged file to ``corrupt/``, never to be sent; False if it is gone."""
        log.error("quarantined %s: %s", queue_id, reason, extra={"queue_id": queue_id})
        try:
            os.rename(self.root / queue / queue_id, self.root / "corrupt" / queue_id)
        except FileNotFoundError:
            return False
        return True

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

    def load(self, queue_id: str, queue: str, *, preload: int = 0) -> StoredMessage:
        """The envelope and where the content is; raises SpoolError if the file is damaged
        or missing. A file of at most ``preload`` bytes is read whole, content included."""
        return self._read_header(self._dirs[queue] + queue_id, queue, preload)

    def load_if_present(
        self, queue_id: str, queue: str, *, preload: int = 0
    ) -> StoredMessage | None:
        """Like ``load``, but None when the file is not there (moved or removed meanwhile)."""
        try:
            return self._read_header(self._dirs[queue] + queue_id, queue, preload, missing_ok=True)
        except FileNotFoundError:
            return None

    def _read_header(
        self, path: Path | str, queue: str, preload: int = 0, *, missing_ok: bool = False
    ) -> StoredMessage:
        name = os.path.basename(path)
        # One open, one fstat and, for a file of at most ``preload`` bytes, one read.
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                whole = size <= preload
                data = f.read(size if whole else _HEAD_READ)
                end = data.find(b"\r\n", 0, 64)
                sealed = data.startswith(SEALED_MAGIC)
                magic = SEALED_MAGIC if sealed else _MAGIC
                if not data.startswith(magic) or end < 0:
                    raise SpoolError("bad header line")
                header_len = int(data[len(magic) : end])
                offset = end + 2 + header_len + 2
                if offset > len(data) and not whole:
                    data += f.read(offset - len(data))
                if len(data) < offset or data[offset - 2 : offset] != b"\r\n":
                    raise SpoolError("truncated envelope")
                header = data[end + 2 : offset - 2]
                cipher = None
                if sealed:
                    cipher = self._file_cipher(name, header[:SALT_BYTES])
                    header = cipher.open_envelope(header[SALT_BYTES:])
                envelope = Envelope.from_json(header)
                if size < offset + _TRAILER_LEN:
                    raise SpoolError("no end record")
                if whole:
                    trailer = data[size - _TRAILER_LEN :]
                else:
                    f.seek(size - _TRAILER_LEN)
                    trailer = f.read(_TRAILER_LEN)
        except FileNotFoundError:
            if missing_ok:
                raise
            raise SpoolError(f"unreadable: no such file: {name}") from None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise SpoolError(f"unreadable: {exc}") from exc
        length = size - offset - _TRAILER_LEN
        if trailer != _trailer(length):
            raise SpoolError("end record missing or length mismatch")
        if envelope.queue_id != name:
            raise SpoolError("queue id does not match file name")
        content = data[offset : offset + length] if whole else None
        if cipher is None:
            return StoredMessage(name, queue, Path(path), envelope, offset, length, content)
        if content is not None:
            content = cipher.open_all(content)
        return StoredMessage(
            name,
            queue,
            Path(path),
            envelope,
            offset,
            plaintext_length(length),
            content,
            cipher=cipher,
            stored_length=length,
        )

    def _file_cipher(self, queue_id: str, salt: bytes) -> FileCipher:
        if self.key is None:
            raise SpoolError(
                "sealed with a spool.key, and none is configured: set spool.key again "
                "(files stay sealed after encrypt_at_rest is turned off)"
            )
        return self.key.for_file(salt, queue_id)

    def move(self, queue_id: str, source: str, target: str) -> None:
        os.rename(self._dirs[source] + queue_id, self._dirs[target] + queue_id)

    def remove(self, queue_id: str, queue: str, *, has_state: bool = True) -> None:
        """Delete a message and its delivery state (``has_state=False``: known to have none,
        which saves a system call per delivered message)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._dirs[queue] + queue_id)
        if has_state:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self._dirs['state']}{queue_id}.json")

    def retire(self, queue_id: str, queue: str, *, has_state: bool = True) -> None:
        """Like ``remove``, for a message that is done; but with ``reuse_files``, while
        ``free/`` holds fewer than ``FREE_FILES`` files, its file goes there, to be
        overwritten by a reception in an accepting process (``SpareFiles``) instead of
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
                self._free_estimate = len(os.listdir(self._dirs[FREE]))
        self._retired += 1
        if self._free_estimate >= FREE_FILES:
            self.remove(queue_id, queue, has_state=has_state)
            return
        with contextlib.suppress(FileNotFoundError):
            os.rename(self._dirs[queue] + queue_id, self._dirs[FREE] + queue_id)
            self._free_estimate += 1
        if has_state:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self._dirs['state']}{queue_id}.json")

    def read_state(self, queue_id: str) -> DeliveryState:
        try:
            raw = (self.root / "state" / f"{queue_id}.json").read_bytes()
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
        path = self.root / "state" / f"{queue_id}.json"
        tmp = path.with_suffix(".json.tmp")
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

    def counts(self) -> dict[str, int]:
        return {q: sum(1 for _ in (self.root / q).iterdir()) for q in QUEUES}
