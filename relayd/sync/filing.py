"""The filing stage: Sent copies of delivered mail, and DSNs for the INBOX, over IMAP.

It runs beside the delivery scheduler and shares nothing with it but the spool: a delivered
message moves from ``active/`` to ``copy/`` and is the stage's from then on. So IMAP being
down, slow or refusing never re-sends a message and never holds up a delivery; the stage
has its own lanes (one worker, hence one IMAP session, per account), its own timers, and its
own retry schedule from ``spool.retry``.

No second copy (SPEC "Sent copy"): before every APPEND the job is marked ``append_issued`` in
the spool; a later attempt after a crash or a lost reply first searches the folder for the
Message-ID (RFC 3501 §6.4.4 SEARCH HEADER) and skips the APPEND if the copy is there. A copy
that cannot be made within ``give_up_after`` of the delivery is dropped with one ALERT line;
a DSN that cannot be filed goes out over SMTP instead, so the sender still hears of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import random
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from relayd.config.model import AccountConfig, Config
from relayd.core.envelope import DeliveryState, Envelope
from relayd.core.lines import as_delivered
from relayd.core.queues import Queue
from relayd.core.routing import find_account
from relayd.core.sentcopy import (
    Filing,
    FilingJob,
    Folder,
    dsn_filing,
    job_of,
    plan_after_failure,
    sent_copy_filing,
    with_job,
)
from relayd.errors import SpoolError
from relayd.maildir import CaptureMaildir
from relayd.metrics import IMAP_COPIES
from relayd.spool.store import Spool, StoredMessage
from relayd.sync import wire
from relayd.sync.backlog import add_dsn, enter_from_active, return_to_delivery
from relayd.sync.connections import ImapConnections
from relayd.sync.imap import ImapError, ImapFailure
from relayd.tasks import TaskSet, vitals

__all__ = ["FAULT_ENV", "FilingEvents", "FilingStage"]

log = logging.getLogger(__name__)

#: Test-only fault point: with ``RELAYD_TEST_FAULT=after-append`` the daemon kills itself
#: right after an APPEND succeeded and before the spool knows, the crash the Message-ID
#: search exists for. Never set in production.
FAULT_ENV = "RELAYD_TEST_FAULT"


def _fault_point(name: str) -> None:
    if os.environ.get(FAULT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


class FilingEvents:
    """What the filing stage tells the alert channels; the base class does nothing."""

    def sent_copy_dropped(self, account: str, queue_id: str, reason: str) -> None:
        """The IMAP Sent copy of a message was given up after ``give_up_after``."""


@dataclass(frozen=True)
class _Ready:
    """A filing to make now; ``msg`` and ``state`` when the caller had them in hand."""

    qid: str
    msg: StoredMessage | None = None
    state: DeliveryState | None = None


@dataclass
class _Lane:
    ready: deque[_Ready] = field(default_factory=deque)
    running: bool = False


@dataclass
class _Item:
    """One filing attempt's context."""

    qid: str
    account: str  # the route's address, for logs and alerts
    state: DeliveryState
    job: FilingJob
    started: float  # the delivery time: the internal date, and when the lifetime began

    @property
    def logx(self) -> dict[str, str]:
        return {"queue_id": self.qid, "account": self.account}


class FilingStage:
    def __init__(
        self,
        *,
        config: Config,
        spool: Spool,
        connections: ImapConnections,
        requeue: Callable[[str], None],
        events: FilingEvents | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        fsync: bool = True,
    ) -> None:
        """``requeue``: hands a DSN put back in ``incoming/`` to the delivery scheduler (it
        goes out over SMTP after all)."""
        self.config = config
        self.spool = spool
        self.connections = connections
        self.requeue = requeue
        self.events = events if events is not None else FilingEvents()
        self.clock = clock
        self.rand = rand
        self.fsync = fsync
        self._lanes: dict[str, _Lane] = {}
        self._timers: list[tuple[float, str]] = []
        self._waiting: set[str] = set()  # queue ids on a timer
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks = TaskSet()
        self._timer_task: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Pick up ``copy/`` after spool recovery: filings interrupted by a stop or crash."""
        for qid in self.spool.list(Queue.COPY):
            job = job_of(self.spool.read_state(qid))
            self._schedule(qid, job.next_attempt_at if job else 0.0)
        self._timer_task = vitals.start("Sent-copy timer", self._timer_loop())

    async def stop(self, timeout: float = 30.0) -> None:
        """Within ``timeout``: filings in flight finish or are cut off (they stay in the
        spool; an APPEND cut off is searched for before the next one), sessions log out."""
        self._stopping = True
        self._wake.set()
        await self._tasks.drain(timeout * 0.8, cancel_late=True, unwind=0.5)
        if self._timer_task is not None:
            self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer_task
        await self.connections.close_all(timeout=max(0.1, timeout * 0.2))

    def set_config(self, config: Config) -> None:
        self.config = config

    # -- intake -------------------------------------------------------------------------

    def take_delivered(
        self, msg: StoredMessage, account: AccountConfig, state: DeliveryState
    ) -> bool:
        """Called when a message's delivery is finished; True if it now waits in ``copy/``.

        Only mail that reached someone gets a copy, and never a DSN (SPEC: a DSN never lands
        in Sent).
        """
        if msg.envelope.is_dsn or not state.delivered:
            return False
        if sent_copy_filing(account) is Filing.NONE:
            return False
        try:
            state = enter_from_active(self.spool, msg.queue_id, state)
        except OSError as exc:
            log.error(
                "ALERT cannot queue the Sent copy (%s); the mail itself was delivered",
                exc.strerror or exc,
                extra={"queue_id": msg.queue_id, "account": account.address},
            )
            return False
        self._enqueue(_Ready(msg.queue_id, self.spool.relocated(msg, Queue.COPY), state))
        return True

    async def take_dsn(self, envelope: Envelope, content: bytes, account: AccountConfig) -> bool:
        """File a DSN in the sender's INBOX over IMAP; False if the account has no IMAP."""
        if dsn_filing(account) is Filing.NONE:
            return False
        try:
            await asyncio.to_thread(add_dsn, self.spool, envelope, content, self.clock())
        except OSError as exc:
            log.error(
                "cannot spool the DSN for IMAP filing (%s); sending it over SMTP",
                exc.strerror or exc,
                extra={"queue_id": envelope.queue_id, "account": account.address},
            )
            return False
        self._enqueue(_Ready(envelope.queue_id))
        return True

    def resume(self, queue_id: str) -> None:
        """A message put (back) into ``copy/`` by someone else: file it now."""
        self._enqueue(_Ready(queue_id))

    def _schedule(self, qid: str, due: float) -> None:
        self._waiting.add(qid)
        heapq.heappush(self._timers, (due, qid))
        self._wake.set()

    def _enqueue(self, ready: _Ready) -> None:
        if self._stopping:
            return  # picked up from copy/ at the next start
        if ready.msg is not None:
            account = ready.msg.envelope.account
        else:
            try:
                msg = self.spool.load_if_present(ready.qid, Queue.COPY)
            except SpoolError as exc:
                self._quarantine(ready.qid, str(exc))
                return
            if msg is None:
                return  # deleted by the operator meanwhile
            account = msg.envelope.account
        lane = self._lanes.setdefault(account, _Lane())
        if all(r.qid != ready.qid for r in lane.ready):
            lane.ready.append(ready)
        if not lane.running:
            lane.running = True
            self._tasks.spawn(self._work(lane))

    async def _timer_loop(self) -> None:
        while not self._stopping:
            now = self.clock()
            delay = 60.0
            try:
                while self._timers and self._timers[0][0] <= now:
                    _, qid = heapq.heappop(self._timers)
                    if qid in self._waiting:
                        self._waiting.discard(qid)
                        self._enqueue(_Ready(qid))
                if self._timers:
                    delay = min(self._timers[0][0] - now, 60.0)
            except Exception:  # one round's trouble: logged, and the next round comes
                log.exception("filing timer round failed")
                delay = 5.0
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, delay))

    # -- filing -------------------------------------------------------------------------

    async def _work(self, lane: _Lane) -> None:
        try:
            while lane.ready and not self._stopping:
                ready = lane.ready.popleft()
                qid = ready.qid
                try:
                    await self._file(ready)
                except Exception:
                    # A bug must not lose the job: it stays in copy/ and is tried again.
                    log.exception("filing failed unexpectedly", extra={"queue_id": qid})
                    self._schedule(qid, self.clock() + self.config.spool.retry.first)
        finally:
            lane.running = False

    def _account_for(self, envelope: Envelope) -> AccountConfig | None:
        found = find_account(self.config, envelope.sender)
        if found is not None and found.address == envelope.account.lower():
            return found
        return find_account(self.config, envelope.account)

    async def _file(self, ready: _Ready) -> None:
        qid = ready.qid
        msg, state = ready.msg, ready.state
        if msg is None or state is None:
            # A retry, or picked up after a start: what the spool holds now.
            try:
                msg = self.spool.load_if_present(qid, Queue.COPY)
            except SpoolError as exc:
                self._quarantine(qid, str(exc))
                return
            if msg is None:
                return  # deleted or held by the operator meanwhile
            state = self.spool.read_state(qid)
        envelope = msg.envelope
        logx = {"queue_id": qid, "account": envelope.account}
        job = job_of(state)
        if job is None:
            if envelope.is_dsn:
                self._to_smtp(qid, "its IMAP filing was being given up", logx)
                return
            # No bookkeeping for a delivered message: assume an APPEND may have landed.
            job = FilingJob(Folder.SENT, append_issued=True)
        item = _Item(qid, envelope.account, state, job, state.delivered_at or envelope.received_at)
        account = self._account_for(envelope)
        if account is None:
            self._failed(item, "sender no longer configured")
            return
        is_sent = job.folder is Folder.SENT
        route = sent_copy_filing(account) if is_sent else dsn_filing(account)
        if route is Filing.NONE:
            if is_sent:
                log.info("no Sent copy: the account's settings no longer ask for one", extra=logx)
                self.spool.remove(qid, Queue.COPY)
            else:
                self._to_smtp(qid, "the account has no IMAP any more", logx)
            return
        # The bytes the DATA phase delivered (CRLF line ends, final CRLF), not the file's.
        raw = msg.preloaded
        if raw is None:
            raw = await asyncio.to_thread(msg.read_content)
        content = as_delivered(raw)
        try:
            if route is Filing.CAPTURE:
                where = await asyncio.to_thread(self._file_capture, account, qid, content)
            else:
                where = await self._file_imap(item, account, envelope.message_id, content)
        except ImapError as err:
            item.job = job_of(self.spool.read_state(qid)) or job  # append_issued may be set
            IMAP_COPIES.inc(account=account.address, result="failed")
            self._imap_failed(item, account, err)
            return
        except OSError as exc:
            self._failed(item, f"capture Maildir: {exc}")
            return
        self.spool.remove(qid, Queue.COPY)
        if route is not Filing.CAPTURE:
            IMAP_COPIES.inc(account=account.address, result="filed")
        what = "Sent copy" if is_sent else "non-delivery notification"
        log.info("%s filed in %s", what, where, extra=logx)

    def _file_capture(self, account: AccountConfig, qid: str, content: bytes) -> str:
        assert account.capture_path is not None
        maildir = CaptureMaildir(account.capture_path, fsync=self.fsync)
        name = f"relayd-{qid}"  # one name per message: a repeated filing finds the first
        if not maildir.has_sent_copy(name):
            maildir.file_sent_copy(content, name=name)
        return f"capture:{account.capture_path}/.Sent"

    async def _file_imap(
        self, item: _Item, account: AccountConfig, message_id: str | None, content: bytes
    ) -> str:
        connections = self.connections
        session = await connections.acquire(account)
        try:
            mailbox = await connections.folder(account, session, item.job.folder)
            # Found at reception; files spooled by earlier versions are read for it.
            msgid = message_id or wire.message_id(content)
            if item.job.append_issued:
                if msgid is None:
                    log.warning(
                        "no Message-ID to look for; appending again may make a second copy",
                        extra=item.logx,
                    )
                elif await session.contains(mailbox, msgid):
                    return f"{mailbox} (already there: {msgid})"
            # Recorded before the APPEND: if we die after it, the next attempt searches.
            self.spool.write_state(item.qid, with_job(item.state, item.job.but(append_issued=True)))
            # A Sent copy is \\Seen like anything one sent; a DSN stays unread in the INBOX.
            reply = await session.append(
                mailbox,
                content,
                when=item.started,
                seen=item.job.folder is Folder.SENT,
            )
            _fault_point("after-append")
            return f"{mailbox} on {session.where} ({reply})"
        except ImapError as err:
            if err.kind is ImapFailure.NO_FOLDER:
                connections.forget_folder(account)
            raise
        finally:
            connections.release(account, session)

    # -- failures -----------------------------------------------------------------------

    def _imap_failed(self, item: _Item, account: AccountConfig, err: ImapError) -> None:
        too_big = err.kind is ImapFailure.TOO_BIG
        if item.job.folder is Folder.INBOX and (too_big or err.kind is ImapFailure.LOGIN_REFUSED):
            self._to_smtp(item.qid, f"IMAP: {err.detail}", item.logx)
            return
        where = f"imap {account.imap.host}:{account.imap.port}" if account.imap else "imap"
        self._failed(item, f"{where}: {err.detail}", permanent=too_big)

    def _failed(self, item: _Item, error: str, *, permanent: bool = False) -> None:
        now = self.clock()
        decision = plan_after_failure(
            item.job,
            started_at=item.started,
            now=now,
            policy=self.config.spool.retry,
            random_unit=self.rand(),
            error=error,
            permanent=permanent,
        )
        new = decision.job
        if decision.give_up and new.folder is Folder.INBOX:
            self._to_smtp(item.qid, f"IMAP filing given up: {error}", item.logx)
            return
        if decision.give_up:
            log.error(
                "ALERT Sent copy dropped after %d attempts (%s); the mail itself was delivered",
                new.attempts,
                error,
                extra=item.logx,
            )
            self.spool.remove(item.qid, Queue.COPY)
            self.events.sent_copy_dropped(item.account, item.qid, error)
            return
        self.spool.write_state(item.qid, with_job(item.state, new))
        log.warning(
            "%s deferred (attempt %d): %s; next try in %.0fs",
            "Sent copy" if new.folder is Folder.SENT else "DSN filing",
            new.attempts,
            error,
            new.next_attempt_at - now,
            extra=item.logx,
        )
        self._schedule(item.qid, new.next_attempt_at)

    def _to_smtp(self, qid: str, why: str, logx: dict[str, str]) -> None:
        log.warning("non-delivery notification goes out over SMTP instead: %s", why, extra=logx)
        return_to_delivery(self.spool, qid)
        self.requeue(qid)

    def _quarantine(self, qid: str, why: str) -> None:
        log.error("cannot read: %s; quarantined", why, extra={"queue_id": qid})
        with contextlib.suppress(OSError):
            self.spool.move(qid, Queue.COPY, Queue.CORRUPT)
