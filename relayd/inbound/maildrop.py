"""``<state>/maildrop/``: where ``relayd sendmail`` leaves mail while the daemon is down.

Like Postfix's maildrop: the directory is 1733 (anyone may add a file, nobody but relayd may
list or read it back), a file is written under a dot-name, fsync'd and renamed into place,
and the daemon picks it up at start and while running. The identity is the file's owner
(SPEC): the kernel sets it, a user cannot give a file away, and a hard link to somebody
else's file is refused (link count must be 1), so a drop cannot claim another user's name.

Files are readable by "other" (0644) because the daemon runs as its own user, not root; the
directory cannot be listed by others and names carry 64 random bits, so nobody else finds
them. A dropped message goes through the same policy as SMTP: the owner's client
(``unix_users``), ``may_send_as``, the route and the header rules; a refused one is moved to
``<state>/maildrop.refused/`` and logged, never silently lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from relayd.core.lines import to_crlf
from relayd.core.routing import (
    Refusal,
    UnixUser,
    check_address_syntax,
    decide_route,
    identify_client,
)
from relayd.inbound.data import SIZE_REPLY
from relayd.inbound.handler import InboundHandler
from relayd.inbound.submission import MessageSink, Submission, submit_whole
from relayd.tasks import vitals
from relayd.unixsocket import unix_user

__all__ = [
    "MAILDROP_MODE",
    "Drop",
    "MaildropPickup",
    "maildrop_path",
    "parse_drop",
    "prepare_maildrop",
    "write_drop",
]

log = logging.getLogger(__name__)

MAILDROP_MODE = 0o1733
_MAGIC = b"RELAYD-MAILDROP 1\n"
# A writer that died mid-file leaves a dot-file; after this long it is not coming back.
_STALE_SECONDS = 24 * 3600.0
POLL_SECONDS = 1.0


def maildrop_path(state_directory: Path) -> Path:
    return state_directory / "maildrop"


@dataclass(frozen=True)
class Drop:
    sender: str
    recipients: tuple[str, ...]
    content: bytes


def encode_drop(drop: Drop) -> bytes:
    meta = {"sender": drop.sender, "recipients": list(drop.recipients), "time": time.time()}
    return _MAGIC + json.dumps(meta, ensure_ascii=False).encode() + b"\n" + drop.content


def parse_drop(raw: bytes) -> Drop:
    """Raises ValueError on anything that is not a complete drop file."""
    if not raw.startswith(_MAGIC):
        raise ValueError("not a maildrop file")
    meta_line, sep, content = raw[len(_MAGIC) :].partition(b"\n")
    if not sep:
        raise ValueError("no envelope line")
    meta = json.loads(meta_line)
    sender, recipients = meta.get("sender"), meta.get("recipients")
    if not isinstance(sender, str) or not isinstance(recipients, list):
        raise ValueError("bad envelope line")
    if not recipients or not all(isinstance(r, str) for r in recipients):
        raise ValueError("no recipients")
    return Drop(sender, tuple(recipients), content)


def write_drop(directory: Path, drop: Drop) -> str:
    """Leave a message for the daemon; returns its file name. Raises OSError."""
    name = f"{time.time_ns():x}.{secrets.token_hex(8)}"
    tmp = directory / f".{name}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(encode_drop(drop))
            f.flush()
        os.fsync(fd)
        os.fchmod(fd, 0o644)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    os.rename(tmp, directory / name)
    # Syncing the directory needs read access to it, which only relayd has; the rename is
    # durable with the next sync of the file system either way.
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return name


def prepare_maildrop(state_directory: Path) -> Path:
    """Create the directory 1733, and make sure other users can reach it (and submit.sock):
    the state directory itself must then be searchable (o+x), never listable."""
    directory = maildrop_path(state_directory)
    directory.mkdir(exist_ok=True)
    os.chmod(directory, MAILDROP_MODE)
    mode = stat.S_IMODE(state_directory.stat().st_mode)
    if mode & 0o011 != 0o011:
        os.chmod(state_directory, mode | 0o011)
    refused = state_directory / "maildrop.refused"
    refused.mkdir(mode=0o700, exist_ok=True)
    return directory


class MaildropPickup:
    def __init__(self, state_directory: Path, handler: InboundHandler) -> None:
        self.directory = maildrop_path(state_directory)
        self.refused = state_directory / "maildrop.refused"
        self.handler = handler
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        self._task = vitals.start("maildrop pickup", self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        while True:
            try:
                await self.scan()
            except Exception:
                log.exception("maildrop scan failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=POLL_SECONDS)

    async def scan(self) -> int:
        """Pick up every complete file; the number queued."""
        queued = 0
        now = time.time()
        for entry in sorted(os.scandir(self.directory), key=lambda e: e.name):
            if entry.name.startswith("."):
                with contextlib.suppress(OSError):
                    if now - entry.stat(follow_symlinks=False).st_mtime > _STALE_SECONDS:
                        os.unlink(entry.path)
                continue
            if await self._pick_up(Path(entry.path)):
                queued += 1
        return queued

    async def _pick_up(self, path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return False
        except OSError as exc:  # a symlink, or something else planted there
            self._refuse(path, "?", f"cannot open: {exc.strerror}")
            return False
        try:
            st = os.fstat(fd)
            owner = unix_user(st.st_uid)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                self._refuse(path, owner, "not a plain file with one link")
                return False
            limit = self.handler.config.spool.max_message_size + 64 * 1024
            with os.fdopen(os.dup(fd), "rb") as f:
                raw = f.read(limit + 1)
        finally:
            os.close(fd)
        try:
            drop = parse_drop(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            self._refuse(path, owner, f"unreadable: {exc}")
            return False
        if len(raw) > limit:
            self._refuse(path, owner, SIZE_REPLY)
            return False
        reply = await self.inject(owner, drop)
        if not reply.startswith("250"):
            self._refuse(path, owner, reply)
            return False
        # Queued (fsync'd) first, removed second: a crash in between delivers twice, never
        # zero times (at-least-once, as for SMTP).
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        log.info("picked up %s from maildrop (uid of %s): %s", path.name, owner, reply)
        return True

    def _refuse(self, path: Path, owner: UnixUser | str, reason: str) -> None:
        log.error(
            "maildrop file %s from %s refused: %s; kept in %s",
            path.name,
            owner,
            reason,
            self.refused,
        )
        with contextlib.suppress(OSError):
            os.rename(path, self.refused / path.name)

    async def inject(self, owner: UnixUser, drop: Drop) -> str:
        """The SMTP policy for a message that did not come over SMTP; the reply it earns."""
        handler = self.handler
        config = handler.config
        client = identify_client(config, unix_user=owner)
        decision = decide_route(config, client, drop.sender, handler.local_hostnames)
        if isinstance(decision, Refusal):
            return decision.reply
        recipients: list[str] = []
        for rcpt in drop.recipients:
            refusal = check_address_syntax(rcpt)
            if refusal is not None:
                return f"{refusal.reply} <{rcpt}>"
            if rcpt.lower() not in (r.lower() for r in recipients):
                recipients.append(rcpt)
        submission = Submission(
            config=config,
            client=client,
            route=decision,
            original_sender=drop.sender,
            recipients=tuple(recipients),
            peer="maildrop",
            smtputf8=not all(a.isascii() for a in (drop.sender, *recipients)),
            local_hostnames=handler.local_hostnames,
        )
        sink = MessageSink(submission, handler.spool, handler.on_queued)
        # Line ends to CRLF, as the SMTP listener does (bare LF from scripts is the rule).
        return await submit_whole(sink, to_crlf(drop.content))
