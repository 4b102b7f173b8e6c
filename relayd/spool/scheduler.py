"""The one place that schedules delivery (Postfix's qmgr): lanes per account, timers, pauses.

Every account has a lane: a ready queue and at most ``limits.max_connections`` workers, each
keeping its upstream session open across messages (one login, many messages — Gmail answers
"454 Too many login attempts" to a login per message). A paused or unhealthy account's lane
does not run, so it never slows another account. Deferred messages wait on one timer heap.
Decisions about what an attempt means live in ``relayd.core``; this module only moves files
and tasks accordingly, and leaves the sender's DSNs to ``relayd.spool.notices``.

Messages come in through ``accept_new`` (accepted here or announced by an accepting process,
relayd.spool.arrivals), ``submit`` (released, retried, relayd's own mail) and, at start, the
intake (relayd.spool.intake), which lists the spool before READY and reads envelopes after.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import random
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from relayd.config.model import AccountConfig, Config
from relayd.core.envelope import DeliveryState
from relayd.core.health import AccountHealth, AccountState
from relayd.core.retry import next_delay
from relayd.core.routing import find_account
from relayd.core.sentcopy import awaits_filing
from relayd.core.states import Plan, Target, plan_after_attempt
from relayd.errors import SpoolError
from relayd.ops.events import DeliveryEvents, is_operator_hold, set_operator_hold
from relayd.spool.accounts import (
    HEALTH_SAVE_SECONDS,
    AccountStore,
    HealthBook,
    credentials_fingerprint,
)
from relayd.spool.intake import SpoolIntake
from relayd.spool.notices import SenderNotices
from relayd.spool.store import Spool, StoredMessage
from relayd.sync.backlog import FILING_QUEUE
from relayd.sync.filing import FilingStage
from relayd.tasks import TaskSet
from relayd.upstream.delivery import AccountSignal, AttemptReport, Deliverer
from relayd.upstream.transport import UpstreamSession

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)

IDLE_SESSION_SECONDS = 30.0
# A message file up to this size is read whole, with its envelope, at the attempt.
PRELOAD_BYTES = 1 << 18


@dataclass
class _Lane:
    account: str
    ready: deque[str] = field(default_factory=deque)
    workers: int = 0
    idle: list[UpstreamSession] = field(default_factory=list)
    sent_at: deque[float] = field(default_factory=deque)
    logins: int = 0
    probing: bool = False


class Scheduler:
    def __init__(
        self,
        *,
        config: Config,
        spool: Spool,
        accounts: AccountStore,
        deliverer: Deliverer,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        consent_of: Callable[[AccountConfig], str] | None = None,
        filing: FilingStage | None = None,
    ) -> None:
        self.config = config
        self.consent_of = consent_of  # OAuth consent id from the token store
        self.filing = filing  # Sent copies and DSNs over IMAP (relayd.sync)
        self.spool = spool
        self.accounts = accounts
        self.deliverer = deliverer
        self.clock = clock
        self.rand = rand
        self.notices = SenderNotices(self)
        self._lanes: dict[str, _Lane] = {}
        self._health = HealthBook(accounts)
        self._timers: list[tuple[float, str]] = []  # (due, queue id) for deferred/
        self._where: dict[str, str] = {}  # queue id -> queue directory
        self._account_of: dict[str, str] = {}  # queue id -> account address
        self._queued: set[str] = set()  # queue ids in some lane's ready queue
        # Accepted since the start and never attempted: no delivery state file exists, so
        # the attempt need not look for one (a system call per message saved).
        self._fresh: set[str] = set()
        self._announced: dict[str, str] = {}  # queue id -> account, see expect()
        self.intake = SpoolIntake(self)
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks = TaskSet()
        self._timer_task: asyncio.Task[None] | None = None
        # Metrics and alerts listen here (relayd.ops.service sets the real one).
        self.events = DeliveryEvents()

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Load account states, list the spool (after recovery; names only, the envelopes
        are read in the background: relayd.spool.intake) and start the timer."""
        self._health.load()
        self.apply_credentials()
        self.intake.list_spool()
        self.intake.start()
        self._timer_task = asyncio.get_running_loop().create_task(self._timer_loop())

    async def stop(self, timeout: float = 30.0) -> None:
        """Drain: no new attempts; wait for the ones in flight, then close sessions."""
        self._stopping = True
        self._wake.set()
        # A delivery cancelled here leaves its message in active/: retried after restart.
        await self._tasks.drain(timeout, cancel_late=True)
        await self.intake.stop()
        if self._timer_task is not None:
            self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer_task
        self._health.flush()
        for lane in self._lanes.values():
            for session in lane.idle:
                await session.quit()
            lane.idle.clear()

    def set_config(self, config: Config) -> None:
        self.config = config
        self.apply_credentials()
        self._release_unpaused_holds()

    # -- health -------------------------------------------------------------------------

    def health(self, address: str) -> AccountHealth:
        return self._health.get(address)

    def _set_health(self, health: AccountHealth) -> None:
        self._health.set(health)
        if health.paused:
            self._wake.set()  # the timer loop sets itself for this account's probe

    def apply_credentials(self) -> None:
        """A paused account whose credentials changed gets a fresh chance (SPEC)."""
        for account in self.config.accounts():
            before = self.health(account.address)
            consent = self.consent_of(account) if self.consent_of is not None else ""
            after = before.on_credentials_changed(credentials_fingerprint(account, consent))
            if before.paused and not after.paused:
                log.info("credentials changed; resuming", extra={"account": account.address})
            self._set_health(after)

    def release_account(self, address: str) -> None:
        self._set_health(self.health(address).on_released())
        self._release_unpaused_holds()

    def _release_unpaused_holds(self) -> None:
        for qid, queue in list(self._where.items()):
            if queue != "hold":
                continue
            account = self._account_of.get(qid)
            if account is None or self.health(account).paused:
                continue
            if is_operator_hold(self.spool, qid):
                continue  # held with `relayd queue hold`: only `release` lets it go
            try:
                self.spool.move(qid, "hold", "incoming")
            except FileNotFoundError:
                self._forget(qid)
                continue
            self._where[qid] = "incoming"
            self.submit(qid)

    # -- intake -------------------------------------------------------------------------

    def knows(self, queue_id: str) -> bool:
        return queue_id in self._where

    def expect(self, queue_id: str, account: str) -> None:
        """The account of a message about to be handed to ``accept_new``, as its accepting
        process announced it: the file need not be read now (the attempt checks it)."""
        self._announced[queue_id] = sys.intern(account)

    def accept_new(self, queue_id: str) -> None:
        """A client got its 250 for this message (from this process or an accepting one):
        queue it, unless it is already known (announced and found by a scan, say)."""
        account = self._announced.pop(queue_id, None)
        if self._stopping or queue_id in self._where:
            return
        if account is None:
            try:
                msg = self.spool.load_if_present(queue_id, "incoming")
            except SpoolError as exc:
                self.spool.quarantine(queue_id, "incoming", str(exc))
                return
            if msg is None:
                return  # delivered and gone already
            account = msg.envelope.account
        self._fresh.add(queue_id)
        self._make_ready(queue_id, account)

    def submit(self, queue_id: str) -> None:
        """A message is durable in incoming/ (recovered, released, retried): queue it."""
        if self._stopping or queue_id in self._queued:
            return
        self._where[queue_id] = "incoming"
        account = self._note_account(queue_id, "incoming")
        if account is None:
            return
        self._make_ready(queue_id, account)

    def _make_ready(self, queue_id: str, account: str) -> None:
        self._where[queue_id] = "incoming"
        self._account_of[queue_id] = account
        lane = self._lanes.setdefault(account, _Lane(account))
        lane.ready.append(queue_id)
        self._queued.add(queue_id)
        self._spawn_workers(lane)

    def reserve(self, queue_id: str, queue: str) -> bool:
        """Start-up intake: the message is known by name; its envelope is read later."""
        if queue_id in self._where:
            return False
        self._where[queue_id] = queue
        return True

    def is_reserved(self, queue_id: str, queue: str) -> bool:
        return self._where.get(queue_id) == queue and queue_id not in self._account_of

    def place(self, queue_id: str, queue: str, account: str, state: DeliveryState | None) -> None:
        """Start-up intake: the envelope of a reserved message has been read."""
        if queue == "incoming":
            if not self._stopping:
                self._make_ready(queue_id, account)
            return
        self._account_of[queue_id] = account
        if queue == "deferred":
            due = state.next_attempt_at if state is not None else 0.0
            heapq.heappush(self._timers, (due, queue_id))
            self._wake.set()

    def intake_done(self) -> None:
        self._release_unpaused_holds()

    def forget(self, queue_id: str) -> None:
        self._forget(queue_id)

    def _note_account(self, queue_id: str, queue: str) -> str | None:
        try:
            msg = self.spool.load(queue_id, queue)
        except SpoolError as exc:
            log.error("cannot read: %s; quarantined", exc, extra={"queue_id": queue_id})
            with contextlib.suppress(OSError):
                self.spool.move(queue_id, queue, "corrupt")
            self._forget(queue_id)
            return None
        self._account_of[queue_id] = msg.envelope.account
        return msg.envelope.account

    def _forget(self, queue_id: str) -> None:
        self._where.pop(queue_id, None)
        self._account_of.pop(queue_id, None)
        self._fresh.discard(queue_id)

    def _spawn_workers(self, lane: _Lane) -> None:
        account = self._account_config(lane.account)
        limit = account.limits.max_connections if account else 1
        while lane.ready and lane.workers < max(1, limit) and not self._stopping:
            lane.workers += 1
            self._tasks.spawn(self._work(lane))

    def _account_config(self, address: str, sender: str | None = None) -> AccountConfig | None:
        found = find_account(self.config, sender or address)
        if found is not None and found.address == address.lower():
            return found
        return find_account(self.config, address)

    # -- timers -------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        while not self._stopping:
            now = self.clock()
            while self._timers and self._timers[0][0] <= now:
                _, qid = heapq.heappop(self._timers)
                if self._where.get(qid) != "deferred":
                    continue
                try:
                    self.spool.move(qid, "deferred", "incoming")
                except FileNotFoundError:
                    self._forget(qid)  # deleted by the operator meanwhile
                    continue
                self.submit(qid)
            self._probe_paused(now)
            if self._health.unsaved:
                self._health.flush()
            delay = min(self._timers[0][0] - now, 60.0) if self._timers else 60.0
            if self._health.unsaved:
                delay = min(delay, HEALTH_SAVE_SECONDS)
            # SPEC: a paused account is probed every retry.max, on time rather than at the
            # next minute's tick. (A probe under way has moved nothing: its end wakes us.)
            probes = [h.retry_at for h in self._health if h.paused and h.retry_at > now]
            if probes:
                delay = min(delay, min(probes) - now)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, delay))

    def flush(self) -> None:
        """Retry every deferred message now (like ``postqueue -f``)."""
        self._timers = [(0.0, qid) for _, qid in self._timers]
        heapq.heapify(self._timers)
        self._wake.set()

    def _defer(self, queue_id: str, due: float) -> None:
        self._where[queue_id] = "deferred"
        heapq.heappush(self._timers, (due, queue_id))
        self._wake.set()

    # -- workers ------------------------------------------------------------------------

    async def _work(self, lane: _Lane) -> None:
        session = lane.idle.pop() if lane.idle else None
        try:
            while lane.ready and not self._stopping:
                qid = lane.ready.popleft()
                self._queued.discard(qid)
                await self._respect_rate_limit(lane)
                try:
                    session = await self._attempt(lane, qid, session)
                except Exception:
                    # A bug must not strand the message: it stays spooled and is retried.
                    log.exception("delivery attempt failed unexpectedly", extra={"queue_id": qid})
                    if session is not None:
                        session.close()
                        session = None
                    if self._where.get(qid) == "active":
                        self._park(qid, "deferred")
                        self._defer(qid, self.clock() + self.config.spool.retry.first)
        finally:
            lane.workers -= 1
            if session is not None and session.is_open:
                lane.idle.append(session)
                asyncio.get_running_loop().call_later(
                    IDLE_SESSION_SECONDS, self._close_idle, lane, session
                )

    def _close_idle(self, lane: _Lane, session: UpstreamSession) -> None:
        if session in lane.idle:
            lane.idle.remove(session)
            self._tasks.spawn(session.quit())

    async def _respect_rate_limit(self, lane: _Lane) -> None:
        account = self._account_config(lane.account)
        per_minute = account.limits.max_messages_per_minute if account else 0
        if per_minute <= 0:
            return
        while True:
            now = self.clock()
            while lane.sent_at and lane.sent_at[0] <= now - 60:
                lane.sent_at.popleft()
            if len(lane.sent_at) < per_minute:
                lane.sent_at.append(now)
                return
            await asyncio.sleep(lane.sent_at[0] + 60 - now)

    async def _attempt(
        self, lane: _Lane, qid: str, session: UpstreamSession | None
    ) -> UpstreamSession | None:
        queue = self._where.get(qid, "incoming")
        fresh = qid in self._fresh
        self._fresh.discard(qid)
        try:
            self.spool.move(qid, queue, "active")
            msg = self.spool.load(qid, "active", preload=PRELOAD_BYTES)
        except FileNotFoundError:
            self._forget(qid)  # deleted by the operator meanwhile
            return session
        except SpoolError as exc:
            log.error("cannot read: %s; quarantined", exc, extra={"queue_id": qid})
            self._park(qid, "corrupt", source="active")
            self._forget(qid)
            return session
        self._where[qid] = "active"
        envelope = msg.envelope
        logx = {"queue_id": qid, "account": envelope.account}
        health = self.health(envelope.account)
        now = self.clock()
        if health.paused:
            self._park(qid, "hold")
            return session
        if not health.accepting_attempts(now):
            self._park(qid, "deferred")
            self._defer(qid, health.retry_at)
            return session
        account = self._account_config(envelope.account, envelope.sender)
        if account is None:
            log.warning("sender no longer configured; mail kept, retrying later", extra=logx)
            self._park(qid, "deferred")
            self._defer(qid, now + self.config.spool.retry.max)
            return session
        state = DeliveryState() if fresh else self.spool.read_state(qid)
        if awaits_filing(state):
            # Delivered already; only its IMAP filing is left (an operator hold and release
            # can bring it back here). It never goes upstream again.
            self._park(qid, FILING_QUEUE)
            self._forget(qid)
            if self.filing is not None:
                self.filing.resume(qid)
            return session
        pending = state.pending(envelope)
        # The spooled message itself: small ones were read with the envelope, big ones are
        # streamed from the file block by block (relayd.upstream.dataphase).
        try:
            report, session = await self.deliverer.attempt(
                account, envelope.sender, pending, msg, session, smtputf8=envelope.smtputf8
            )
        except SpoolError as exc:
            # Found while streaming a big file (a small one is read whole at load): cut
            # short, or a sealed segment that does not open. Never sent; kept for a look.
            log.error("cannot read: %s; quarantined", exc, extra=logx)
            self._park(qid, "corrupt", source="active")
            self._forget(qid)
            return None  # the session was dropped mid-DATA
        lane.logins += report.sessions_opened
        now = self.clock()
        paused = self._apply_signal(account, report, now, logx)
        plan = plan_after_attempt(
            envelope,
            state,
            report.results,
            now=now,
            policy=self.config.spool.retry,
            random_unit=self.rand(),
            relay=report.relay,
            account_paused=paused,
            delay_warning=self.config.spool.delay_warning,
        )
        self._log_attempt(msg, plan, report, now, logx)
        await self._carry_out(msg, account, plan, logx, has_state=not fresh)
        return session

    def _apply_signal(
        self, account: AccountConfig, report: AttemptReport, now: float, logx: dict[str, str]
    ) -> bool:
        """Update the account's health from the attempt; True if it is now paused."""
        health = self.health(account.address)
        retry = self.config.spool.retry
        if report.signal is AccountSignal.CREDENTIALS_REFUSED:
            health = health.on_credentials_refused(now, report.detail, probe_after=retry.max)
            if health.paused and health.alerted_at is None:
                # One alert per incident (SPEC); issue-5 alert channels hook in here.
                log.error(
                    "ALERT account paused: credentials refused twice in a row (%s); mail is "
                    "held, not bounced. Fix the password/token, then reload or restart, or run "
                    "`relayd queue release --account %s`",
                    report.detail,
                    account.address,
                    extra=logx,
                )
                health = health.but_alerted(now)
                self.events.account_paused(account, report.detail)
        elif report.signal is AccountSignal.CONNECTION_FAILED:
            streak = health.connection_failures + 1
            health = health.on_connection_failure(
                now, report.detail, next_delay(retry, streak, self.rand())
            )
            self.events.connection_failed(account, report.detail)
        elif report.signal is AccountSignal.SEND_AS_DENIED:
            log.error("ALERT send-as refused by the provider: %s", report.detail, extra=logx)
            health = health.on_message_failure(now, report.detail)
            self.events.send_as_denied(account, report.detail)
        elif report.signal is AccountSignal.LOGIN_OK or report.results:
            self.events.attempt_succeeded(account)
            if all(r.verdict.value == "delivered" for r in report.results):
                health = health.on_success(now)
            else:
                health = health.on_message_failure(now, report.results[-1].reply)
        self._set_health(health)
        if health.paused:
            self._hold_account(account.address)
        return health.paused

    def _hold_account(self, address: str) -> None:
        """Move the account's waiting mail to hold/ (visible on disk, not attempted)."""
        lane = self._lanes.get(address)
        if lane is not None:
            while lane.ready:
                qid = lane.ready.popleft()
                self._queued.discard(qid)
                self._park(qid, "hold")
        for qid, queue in list(self._where.items()):
            if queue == "deferred" and self._account_of.get(qid) == address:
                self._park(qid, "hold", source="deferred")

    def _park(self, qid: str, target: str, source: str | None = None) -> None:
        source = source or self._where.get(qid, "active")
        if source == target:
            return
        try:
            self.spool.move(qid, source, target)
        except FileNotFoundError:
            self._forget(qid)
            return
        self._where[qid] = target

    def _log_attempt(
        self,
        msg: StoredMessage,
        plan: Plan,
        report: AttemptReport,
        now: float,
        logx: dict[str, str],
    ) -> None:
        for r in report.results:
            status = r.verdict.value
            if status == "held" and plan.target is not Target.HOLD:
                status = "deferred"
            if r.recipient in {b.recipient for b in plan.bounce}:
                status = "bounced"
            log.info(
                "to=<%s>, relay=%s, delay=%.1f, attempts=%d, dsn=%s, status=%s (%s)",
                r.recipient,
                report.relay,
                now - msg.envelope.received_at,
                plan.state.attempts,
                r.status,
                status,
                r.reply,
                extra=logx,
            )
            self.events.recipient_outcome(
                msg.envelope.account, status, now - msg.envelope.received_at
            )
        if plan.expired:
            self.events.mail_expired(msg.envelope, tuple(b.recipient for b in plan.bounce))

    async def _carry_out(
        self,
        msg: StoredMessage,
        account: AccountConfig,
        plan: Plan,
        logx: dict[str, str],
        *,
        has_state: bool = True,
    ) -> None:
        qid = msg.queue_id
        if plan.bounce or plan.delayed:
            await self.notices.after_attempt(msg, account, plan, logx)
        if plan.target is Target.DONE:
            # The Sent copy is a step of its own: the message moves to copy/ and is the
            # filing stage's from here, so IMAP trouble never sends it again.
            if self.filing is None or not self.filing.take_delivered(msg, account, plan.state):
                # (A state file the filing stage wrote and could not use is an orphan that
                # the next start's recovery removes.)
                self.spool.retire(qid, "active", has_state=has_state)
            self._forget(qid)
            return
        self.spool.write_state(qid, plan.state)
        if plan.target is Target.HOLD:
            self._park(qid, "hold")
            return
        self._park(qid, "deferred")
        self._defer(qid, plan.state.next_attempt_at)

    # -- paused accounts ----------------------------------------------------------------

    def _probe_paused(self, now: float) -> None:
        for health in self._health:
            if not health.paused or now < health.retry_at:
                continue
            lane = self._lanes.setdefault(health.address, _Lane(health.address))
            if lane.probing:
                continue
            account = self._account_config(health.address)
            if account is None or account.is_capture:
                continue
            lane.probing = True
            self._tasks.spawn(self._probe(lane, account))

    async def _probe(self, lane: _Lane, account: AccountConfig) -> None:
        """SPEC: a paused account is probed with a login alone every retry.max."""
        logx = {"account": account.address}
        session = self.deliverer.new_session(account)
        try:
            await session.probe()
        except Exception as exc:
            health = self.health(account.address)
            retry_at = self.clock() + self.config.spool.retry.max
            self._set_health(health.with_retry_at(retry_at))
            log.info("probe failed (%s); still paused", exc, extra=logx)
        else:
            log.info("probe login succeeded; resuming", extra=logx)
            self.release_account(account.address)
        finally:
            lane.probing = False

    # -- the operator's queue commands (relayd queue, over the control socket) -----------

    def where(self, queue_id: str) -> str | None:
        return self._where.get(queue_id) or self.spool.locate(queue_id)

    def flush_messages(self, queue_ids: set[str]) -> int:
        """Retry these deferred messages now (``relayd queue flush ID``)."""
        found = 0
        timers = []
        for due, qid in self._timers:
            if qid in queue_ids:
                due, found = 0.0, found + 1
            timers.append((due, qid))
        self._timers = timers
        heapq.heapify(self._timers)
        self._wake.set()
        return found

    def retry_unhealthy_now(self, account: str | None = None) -> None:
        """An operator's flush also ends the wait of upstreams marked unhealthy (not pauses:
        those need fixed credentials, not another try)."""
        for health in self._health:
            if health.state is AccountState.UNHEALTHY and account in (None, health.address):
                self._set_health(health.with_retry_at(0.0))

    def hold_message(self, queue_id: str) -> bool:
        """Keep a message from being attempted until released; False if being delivered."""
        queue = self.where(queue_id)
        if queue is None or queue == "hold":
            return queue == "hold"
        if queue == "active":
            return False
        lane = self._lanes.get(self._account_of.get(queue_id, ""))
        if lane is not None and queue_id in lane.ready:
            lane.ready.remove(queue_id)
        self._queued.discard(queue_id)
        self._fresh.discard(queue_id)  # set_operator_hold writes its delivery state
        set_operator_hold(self.spool, queue_id, True)
        self._park(queue_id, "hold", source=queue)
        self._note_account(queue_id, "hold")
        return True

    def release_message(self, queue_id: str) -> bool:
        """Put a held message back in line; it stays held while its account is paused."""
        if self.where(queue_id) != "hold":
            return False
        set_operator_hold(self.spool, queue_id, False)
        try:
            self.spool.move(queue_id, "hold", "incoming")
        except FileNotFoundError:
            self._forget(queue_id)
            return False
        self.submit(queue_id)
        return True

    def delete_message(self, queue_id: str) -> bool:
        """Remove a message for good (``postsuper -d``); False if being delivered."""
        queue = self.where(queue_id)
        if queue is None or queue == "active":
            return False
        lane = self._lanes.get(self._account_of.get(queue_id, ""))
        if lane is not None and queue_id in lane.ready:
            lane.ready.remove(queue_id)
        self._queued.discard(queue_id)
        self.spool.remove(queue_id, queue)
        self._forget(queue_id)
        return True
