"""One attempt of one message: from ``incoming/`` through the transport to its next queue.

The message is moved to ``active/`` and its file read (and checked) once; its account comes
with its lane, its delivery state with it from the attempt before (or none: accepted since
the start and never tried). What the transport reports becomes the account's new health
(``relayd.core.health``) and the message's plan (``relayd.core.states``); this module only
carries them out: the log line per recipient, the DSNs, and the move to the next queue. A
delivered message that wants a Sent copy goes to the filing stage with the message and its
state in hand, so nothing is read twice.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Protocol

from relayd.config.model import AccountConfig, SpoolConfig
from relayd.core.envelope import DeliveryState
from relayd.core.health import UNHEALTHY_AFTER_FAILURES, AccountHealth, AccountState
from relayd.core.outcome import Failure, FailureKind, Reply, Verdict
from relayd.core.queues import Queue
from relayd.core.retry import next_delay
from relayd.core.sentcopy import awaits_filing
from relayd.core.states import Plan, Target, plan_after_attempt
from relayd.errors import SpoolError
from relayd.queue.events import DeliveryEvents
from relayd.queue.lanes import Lane
from relayd.queue.notices import SenderNotices
from relayd.spool.message import InProgress
from relayd.spool.store import Spool, StoredMessage
from relayd.sync.filing import FilingStage
from relayd.upstream.delivery import AccountSignal, AttemptReport, Deliverer
from relayd.upstream.transport import Transport

__all__ = ["PRELOAD_BYTES", "AttemptRunner", "Parking"]

log = logging.getLogger(__name__)

# A message file up to this size is read whole, with its envelope, at the attempt.
PRELOAD_BYTES = 1 << 18


class Parking(Protocol):
    """How the attempt tells the scheduler where a message went (the scheduler moves it)."""

    def park(self, queue_id: str, target: Queue, source: Queue = Queue.ACTIVE) -> bool:
        """Move it; False if it is gone, or the disk refused (then it is retried later)."""
        ...

    def retry_later(self, queue_id: str, where: Queue, why: str) -> None:
        """The disk refused a step: the message stays in ``where`` and is taken up again."""
        ...

    def defer(self, queue_id: str, due: float) -> None:
        """Park in ``deferred/`` with a retry at ``due``."""
        ...

    def forget(self, queue_id: str) -> None:
        """No longer the scheduler's (delivered, quarantined, handed to filing, gone)."""
        ...

    def health(self, address: str) -> AccountHealth: ...

    def set_health(self, health: AccountHealth) -> None:
        """Record the account's new health; a pause holds its waiting mail."""
        ...


class AttemptRunner:
    def __init__(
        self,
        *,
        spool: Spool,
        deliverer: Deliverer,
        parking: Parking,
        notices: SenderNotices,
        filing: FilingStage | None,
        events: DeliveryEvents,
        settings: Callable[[], SpoolConfig],
        clock: Callable[[], float],
        rand: Callable[[], float],
    ) -> None:
        self.spool = spool
        self.deliverer = deliverer
        self.parking = parking
        self.notices = notices
        self.filing = filing
        self.events = events
        self.settings = settings  # spool.* of the configuration in force (reloads change it)
        self.clock = clock
        self.rand = rand

    async def run(
        self, lane: Lane, queue_id: str, transport: Transport | None, *, fresh: bool
    ) -> Transport | None:
        """Attempt ``queue_id`` (in ``incoming/``) over ``transport``; the transport to keep.

        ``fresh``: accepted since the start and never attempted, so it has no delivery state
        to read (a system call per message saved).
        """
        parking = self.parking
        try:
            self.spool.move(queue_id, Queue.INCOMING, Queue.ACTIVE)
        except FileNotFoundError:
            parking.forget(queue_id)  # deleted by the operator meanwhile
            return transport
        except OSError as exc:  # a read-only or full disk: not this message's fault
            parking.retry_later(queue_id, Queue.INCOMING, f"cannot start an attempt: {exc}")
            return transport
        try:
            msg = self.spool.load(queue_id, Queue.ACTIVE, preload=PRELOAD_BYTES)
        except InProgress:
            # Reserved for a reception still under way (nothing announces those): put back;
            # its accepting process announces it once it is a message.
            log.warning("not a message yet; left to its reception", extra={"queue_id": queue_id})
            parking.park(queue_id, Queue.INCOMING)
            parking.forget(queue_id)
            return transport
        except FileNotFoundError:
            parking.forget(queue_id)  # deleted by the operator meanwhile
            return transport
        except SpoolError as exc:
            log.error("cannot read: %s; quarantined", exc, extra={"queue_id": queue_id})
            parking.park(queue_id, Queue.CORRUPT)
            parking.forget(queue_id)
            return transport
        envelope = msg.envelope
        logx = {"queue_id": queue_id, "account": envelope.account}
        health = parking.health(envelope.account)
        now = self.clock()
        settings = self.settings()
        if health.paused:
            parking.park(queue_id, Queue.HOLD)
            return transport
        if not health.accepting_attempts(now):
            parking.defer(queue_id, health.retry_at)
            return transport
        account = lane.account
        if account is None:
            log.warning("sender no longer configured; mail kept, retrying later", extra=logx)
            parking.defer(queue_id, now + settings.retry.max)
            return transport
        state = DeliveryState() if fresh else self.spool.read_state(queue_id)
        if awaits_filing(state):
            # Delivered already; only its IMAP filing is left (an operator hold and release
            # can bring it back here). It never goes upstream again.
            parking.park(queue_id, Queue.COPY)
            parking.forget(queue_id)
            if self.filing is not None:
                self.filing.resume(queue_id)
            return transport
        try:
            report, transport = await self.deliverer.attempt(
                account,
                envelope.sender,
                state.pending(envelope),
                msg,
                transport,
                smtputf8=envelope.smtputf8,
            )
        except SpoolError as exc:
            # Found while streaming a big file (a small one is read whole at load): cut
            # short, or a sealed segment that does not open. Never sent; kept for a look.
            log.error("cannot read: %s; quarantined", exc, extra=logx)
            parking.park(queue_id, Queue.CORRUPT)
            parking.forget(queue_id)
            return None  # the transport was dropped mid-DATA
        lane.logins += report.sessions_opened
        now = self.clock()
        if report.signal is AccountSignal.THROTTLED:
            # The whole lane slows down (relayd.core.throttle): one connection fewer than
            # were in use, and a pause before its next attempt.
            # An HTTP API's Retry-After says how long; an SMTP throttle reply does not.
            asked = report.cause.retry_after if isinstance(report.cause, Reply) else None
            lane.throttle = lane.throttle.on_throttled(
                now, in_use=max(1, lane.workers), retry_after=asked
            )
            log.warning(
                "throttled by the provider (%s): %d connections, next attempt in %.0f s",
                report.detail,
                lane.max_connections,
                lane.throttle.wait(now),
                extra=logx,
            )
        elif any(r.verdict is Verdict.DELIVERED for r in report.results):
            lane.throttle = lane.throttle.on_delivered(now, lane.configured_connections)
        paused = self._apply_signal(account, report, now, settings, logx)
        plan = plan_after_attempt(
            envelope,
            state,
            report.results,
            now=now,
            policy=settings.retry,
            random_unit=self.rand(),
            relay=report.relay,
            account_paused=paused,
            delay_warning=settings.delay_warning,
        )
        if report.signal is AccountSignal.THROTTLED and plan.target is Target.DEFERRED:
            # Tried again when the lane opens, not on the retry schedule.
            due = max(now, lane.throttle.paused_until)
            plan = dataclasses.replace(plan, state=plan.state.but(next_attempt_at=due))
        self._log(msg, plan, report, now, logx)
        await self._carry_out(msg, account, plan, settings, logx, has_state=not fresh)
        return transport

    def _apply_signal(
        self,
        account: AccountConfig,
        report: AttemptReport,
        now: float,
        settings: SpoolConfig,
        logx: dict[str, str],
    ) -> bool:
        """Update the account's health from the attempt; True if it is now paused."""
        parking = self.parking
        health = parking.health(account.address)
        retry = settings.retry
        cause = report.cause
        if isinstance(cause, Failure) and cause.kind is FailureKind.PERMISSION:
            # An HTTP API's 403: a permission only an administrator can grant. Paused at
            # once, and not probed (a token alone cannot show the permission is there).
            health = health.on_permission_refused(now, report.detail)
            if health.alerted_at is None:
                log.error(
                    "ALERT account paused: %s; mail is held, not bounced. When fixed, run "
                    "`relayd queue release --account %s`",
                    report.detail,
                    account.address,
                    extra=logx,
                )
                health = health.but_alerted(now)
                self.events.account_paused(account, report.detail)
        elif report.signal is AccountSignal.CREDENTIALS_REFUSED:
            health = health.on_credentials_refused(now, report.detail, probe_after=retry.max)
            if health.paused and health.alerted_at is None:
                # One alert per incident (SPEC); the alert channels listen to the events.
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
            if health.state is AccountState.UNHEALTHY and streak == UNHEALTHY_AFTER_FAILURES:
                # Logged once, when the account is parked: its mail then waits without
                # attempts, and the operator needs to know why and until when.
                log.warning(
                    "upstream unhealthy after %d failed connections in a row (%s); its mail "
                    "waits, next probe at %s",
                    streak,
                    report.detail,
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(health.retry_at)),
                    extra=logx,
                )
            if report.cause is not None:
                self.events.connection_failed(account, report.cause)
        elif report.signal is AccountSignal.THROTTLED:
            health = health.on_throttled(now, report.detail)
        elif report.signal is AccountSignal.SEND_AS_DENIED:
            log.error("ALERT send-as refused by the provider: %s", report.detail, extra=logx)
            health = health.on_message_failure(now, report.detail)
            self.events.send_as_denied(account, report.detail)
        elif report.signal is AccountSignal.LOGIN_OK or report.results:
            self.events.attempt_succeeded(account)
            if all(r.verdict is Verdict.DELIVERED for r in report.results):
                health = health.on_success(now)
            else:
                health = health.on_message_failure(now, report.results[-1].reply)
        parking.set_health(health)
        return health.paused

    def _log(
        self,
        msg: StoredMessage,
        plan: Plan,
        report: AttemptReport,
        now: float,
        logx: dict[str, str],
    ) -> None:
        bounced = {b.recipient for b in plan.bounce}
        delay = now - msg.envelope.received_at
        for r in report.results:
            status = r.verdict.value
            if r.verdict is Verdict.HELD and plan.target is not Target.HOLD:
                status = Verdict.DEFERRED.value
            if r.recipient in bounced:
                status = Verdict.BOUNCED.value
            log.info(
                "to=<%s>, relay=%s, delay=%.1f, attempts=%d, dsn=%s, status=%s (%s)",
                r.recipient,
                report.relay,
                delay,
                plan.state.attempts,
                r.status,
                status,
                r.reply,
                extra=logx,
            )
            self.events.recipient_outcome(msg.envelope.account, status, delay)
        if plan.expired:
            self.events.mail_expired(msg.envelope, tuple(b.recipient for b in plan.bounce))

    async def _carry_out(
        self,
        msg: StoredMessage,
        account: AccountConfig,
        plan: Plan,
        settings: SpoolConfig,
        logx: dict[str, str],
        *,
        has_state: bool,
    ) -> None:
        queue_id = msg.queue_id
        if plan.bounce or plan.delayed:
            await self.notices.after_attempt(msg, account, plan, settings.retry.give_up_after, logx)
        if plan.target is Target.DONE:
            # The Sent copy is a step of its own: the message moves to copy/ and is the
            # filing stage's from here, so IMAP trouble never sends it again.
            if self.filing is None or not self.filing.take_delivered(msg, account, plan.state):
                # (A state file the filing stage wrote and could not use is an orphan that
                # the next start's recovery removes.)
                self.spool.retire(queue_id, Queue.ACTIVE, has_state=has_state)
            self.parking.forget(queue_id)
            return
        self.spool.write_state(queue_id, plan.state)
        if plan.target is Target.HOLD:
            self.parking.park(queue_id, Queue.HOLD)
            return
        self.parking.defer(queue_id, plan.state.next_attempt_at)
