"""How news of mail in ``incoming/`` reaches the one scheduler (Postfix's qmgr trigger).

Inside the main process, whoever puts a message into ``incoming/`` (an SMTP session of its
own, the maildrop, an alert, a DSN that could not be filed) tells the ``Inlet``. Accepting
processes tell the main process over a socket, and its ``ArrivalInbox`` passes what it hears
on to the ``Inlet`` too.

An accepting process announces each queue id it answered 250 for with a datagram on a unix
socket pair made before it was forked (``announcer``/``inbox`` ends). A datagram is a hint,
not the record: the spool on disk is. A datagram can be lost (the receiving buffer full, a
process killed between its rename and its send), so the scheduling side also lists
``incoming/`` on a timer and adopts what it finds there twice in a row without having heard
of it — two looks, so that a message announced a moment late is not taken for a lost one.

The same socket carries the accepting processes' "listening" notices (``READY`` waits for
them). Wire format: records ending in a newline; ``<queue id> <account>`` (the queue id is
20 upper-case hex digits; the account, when given, spares the scheduler reading the file to
know the message's lane), or ``+ready:<pid>`` when a process serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
from collections.abc import Callable
from pathlib import Path

from relayd.spool.fileformat import is_complete
from relayd.tasks import vitals

__all__ = ["Announcer", "ArrivalInbox", "Inlet", "arrival_channel"]

log = logging.getLogger(__name__)

_QUEUE_ID = re.compile(rb"[0-9A-F]{20}")
_QUEUE_ID_TEXT = re.compile(r"[0-9A-F]{20}")
_READY = b"+ready:"
# Under the smallest datagram limit of a unix socket pair with default buffers.
_MAX_DATAGRAM = 32 * 1024
SCAN_SECONDS = 2.0


class Inlet:
    """The scheduler's door for mail that is durable in ``incoming/``.

    ``new_mail``: accepted and never attempted (no delivery state yet); the account, when
    the caller knows it, spares reading the file. ``requeued``: back in ``incoming/`` with a
    history (a DSN that goes out over SMTP after all). The scheduler connects once, when it
    is built; what arrives before that waits here.
    """

    def __init__(self) -> None:
        self._new: Callable[[str, str | None], None] | None = None
        self._requeued: Callable[[str], None] | None = None
        self._early: list[tuple[str, str | None, bool]] = []

    def connect(
        self, new_mail: Callable[[str, str | None], None], requeued: Callable[[str], None]
    ) -> None:
        self._new, self._requeued = new_mail, requeued
        early, self._early = self._early, []
        for queue_id, account, fresh in early:
            if fresh:
                new_mail(queue_id, account)
            else:
                requeued(queue_id)

    def new_mail(self, queue_id: str, account: str | None = None) -> None:
        if self._new is None:
            self._early.append((queue_id, account, True))
            return
        self._new(queue_id, account)

    def requeued(self, queue_id: str) -> None:
        if self._requeued is None:
            self._early.append((queue_id, None, False))
            return
        self._requeued(queue_id)


def arrival_channel() -> tuple[socket.socket, socket.socket]:
    """(inbox end for the scheduler, announcer end shared by the accepting processes)."""
    inbox, announcer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for sock in (inbox, announcer):
        sock.setblocking(False)
    with contextlib.suppress(OSError):  # more room for bursts, where the system allows it
        inbox.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return inbox, announcer


class Announcer:
    """The accepting side: queue ids gathered during one turn of the event loop go out in
    one datagram, so a burst of commits costs one system call, not one per message."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._pending: list[bytes] = []
        self._size = 0
        self._scheduled = False

    def announce(self, queue_id: str, account: str = "") -> None:
        record = f"{queue_id} {account}\n".encode("utf-8", "surrogateescape")
        self._pending.append(record)
        self._size += len(record)
        if self._size >= _MAX_DATAGRAM:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def ready(self) -> None:
        self._send(_READY + str(os.getpid()).encode() + b"\n")

    def flush(self) -> None:
        self._scheduled = False
        if self._pending:
            batch, self._pending, self._size = self._pending, [], 0
            self._send(b"".join(batch))

    def _send(self, datagram: bytes) -> None:
        try:
            self.sock.send(datagram)
        except OSError as exc:
            # Nothing is lost: the scheduler's scan of incoming/ finds these files.
            log.warning(
                "cannot notify the scheduler (%s); it will find the mail in the spool",
                exc.strerror or exc,
            )


class ArrivalInbox:
    """The scheduling side: hears announcements and scans ``incoming/`` as the safety net.

    ``on_arrival(queue_id, account)`` is called for each new queue id (the account None when
    not announced); ``knows(queue_id)`` says whether the scheduler has it already (those
    found by the scan are skipped).
    """

    def __init__(
        self,
        sock: socket.socket,
        incoming: Path,
        *,
        on_arrival: Callable[[str, str | None], None],
        knows: Callable[[str], bool],
        on_ready: Callable[[int], None] = lambda pid: None,
        scan_seconds: float = SCAN_SECONDS,
    ) -> None:
        self.sock = sock
        self.incoming = incoming
        self.on_arrival = on_arrival
        self.knows = knows
        self.on_ready = on_ready
        self.scan_seconds = scan_seconds
        self._scan_task: asyncio.Task[None] | None = None
        self._unknown: set[str] = set()  # seen by the last scan and not known then

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.sock.fileno(), self._readable)
        self._scan_task = vitals.start("scan of incoming/", self._scan_loop())

    async def stop(self) -> None:
        """Stop listening; what is still in the socket is read first."""
        self._readable()
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        if self._scan_task is not None:
            self._scan_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scan_task

    def _readable(self) -> None:
        while True:
            try:
                datagram = self.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.error("arrival socket: %s", exc)
                return
            for record in datagram.split(b"\n"):
                if record.startswith(_READY) and record[len(_READY) :].isdigit():
                    self.on_ready(int(record[len(_READY) :]))
                    continue
                word, _, account = record.partition(b" ")
                if _QUEUE_ID.fullmatch(word):
                    text = account.decode("utf-8", "surrogateescape") or None
                    self._arrived(word.decode("ascii"), text)

    def _arrived(self, queue_id: str, account: str | None) -> None:
        try:
            self.on_arrival(queue_id, account)
        except Exception:  # the file is in incoming/: the scan picks it up
            log.exception("cannot take a new message", extra={"queue_id": queue_id})

    async def _scan_loop(self) -> None:
        while True:
            await asyncio.sleep(self.scan_seconds)
            try:
                await self.scan()
            except Exception:
                log.exception("scan of incoming/ failed")

    def _messages_among(self, names: set[str]) -> set[str]:
        found = set()
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                if is_complete(os.stat(self.incoming / name).st_mode):
                    found.add(name)
        return found

    async def scan(self) -> int:
        """Adopt what has waited in incoming/ unannounced since the last scan; the count."""
        names = await asyncio.to_thread(os.listdir, self.incoming)
        unknown = {n for n in names if not self.knows(n) and _QUEUE_ID_TEXT.fullmatch(n)}
        # Files reserved for receptions still in progress are no news (relayd.spool.reserved).
        candidates = await asyncio.to_thread(self._messages_among, unknown & self._unknown)
        found = 0
        for queue_id in sorted(candidates):
            if not self.knows(queue_id):
                log.info("found in incoming/ without an announcement", extra={"queue_id": queue_id})
                self._arrived(queue_id, None)
                found += 1
        self._unknown = unknown
        return found
