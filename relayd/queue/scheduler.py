"""The one place that schedules delivery (Postfix's qmgr): lanes, timers, pauses.

Messages come in through the ``Inlet`` (accepted here or announced by an accepting process,
``relayd.queue.arrivals``; relayd's own mail; a DSN that goes out over SMTP after all) and,
at start, through the intake (``relayd.queue.intake``), which lists the spool before READY
and reads envelopes after. Each message joins its account's lane (``relayd.queue.lanes``);
deferred ones wait on one timer heap (``relayd.queue.timers``); one attempt is
``relayd.queue.attempt``; the operator's commands are ``relayd.queue.commands``, which the
scheduler serves as their ``QueueView``. What an attempt means is decided in
``relayd.core``; this module keeps track of where each message is and starts the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
from collections.abc import Callable

from relayd.config.model import AccountConfig, Config, SpoolConfig
from relayd.core.health import AccountHealth, credentials_fingerprint
from relayd.core.queues import Queue
from relayd.core.routing import known_accounts
from relayd.errors import SpoolError
from relayd.queue.arrivals import Inlet
from relayd.queue.attempt import AttemptRunner
from relayd.queue.commands import StoppedQueue
from relayd.queue.events import DeliveryEvents
from relayd.queue.intake import SpoolIntake, SpoolRead
from relayd.queue.lanes import Lane, LaneBudget, Lanes, LaneWorkers
from relayd.queue.notices import SenderNotices
from relayd.queue.timers import RetryTimers
from relayd.queue.tracking import Tracked, Tracker
from relayd.spool.accounts import HEALTH_SAVE_SECONDS, AccountStore, HealthBook
from relayd.spool.store import Spool
from relayd.sync.filing import FilingStage
from relayd.tasks import TaskSet, vitals
from relayd.upstream.delivery import Deliverer
from relayd.upstream.transport import Transport

__all__ = ["Scheduler"]

log = logging.getLogger(__name__)

TIMER_TICK_SECONDS = 60.0
# The longest wait before a message the disk refused to move is looked at again.
MAX_TROUBLE_WAIT = 60.0


class Scheduler:
    def __init__(
        self,
        *,
        config: Config,
        spool: Spool,
        accounts: AccountStore,
        deliverer: Deliverer,
        inlet: Inlet,
        filing: FilingStage | None = None,
        events: DeliveryEvents | None = None,
        consent_of: Callable[[AccountConfig], str] | None = None,
        budget: LaneBudget | None = None,
        on_health: Callable[[AccountHealth, AccountHealth], None] | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """``consent_of(account)``: the id of the account's OAuth consent in the token store
        (a new ``relayd auth`` resumes a paused account); ``filing``: Sent copies and DSNs
        over IMAP (relayd.sync); ``budget``: connections and message starts shared with
        other hosts (fleet mode); ``on_health(before, after)``: every change of an account's
        health (fleet mode shares pauses)."""
        self.config = config
        self.spool = spool
        self.deliverer = deliverer
        self.filing = filing
        self.consent_of = consent_of
        self.on_health = on_health
        self.clock = clock
        self.rand = rand
        self.book = HealthBook(accounts)
        self._tracked = Tracker()
        self._lanes = Lanes(config)
        self._timers = RetryTimers()
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks = TaskSet()
        self._timer_task: asyncio.Task[None] | None = None
        events = events if events is not None else DeliveryEvents()
        notices = SenderNotices(
            spool=spool,
            filing=filing,
            enqueue=self.new_mail,
            reporting_host=config.helo_name or socket.getfqdn(),
            clock=clock,
        )
        self._attempts = AttemptRunner(
            spool=spool,
            deliverer=deliverer,
            parking=self,
            notices=notices,
            filing=filing,
            events=events,
            settings=self._spool_settings,
            clock=clock,
            rand=rand,
        )
        self._workers = LaneWorkers(
            next_message=self._next_message,
            attempt=self._attempt,
            clock=clock,
            tasks=self._tasks,
            budget=budget,
        )
        self.intake = SpoolIntake(spool, take=self._take_read, done=self._release_unpaused_holds)
        inlet.connect(self.new_mail, self.requeued)

    def _spool_settings(self) -> SpoolConfig:
        return self.config.spool

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Load account states, list the spool (after recovery; names only, the envelopes
        are read in the background) and start the timer."""
        self.book.load()
        self.apply_credentials()
        self.intake.list_spool(self._reserve)
        self.intake.start()
        self._timer_task = vitals.start("retry timer", self._timer_loop())

    async def stop(self, timeout: float = 30.0) -> None:
        """Drain within ``timeout``: no new attempts; the ones in flight finish or are cut off
        (their messages stay in active/ and go out again after the restart); then the idle
        sessions are told QUIT."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._stopping = self._workers.stopping = True
        self._wake.set()
        await self._tasks.drain(timeout - 1.0, cancel_late=True, unwind=0.5)
        await self.intake.stop()
        if self._timer_task is not None:
            self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer_task
        self.book.flush()
        idle = [lane.idle.pop() for lane in self._lanes for _ in range(len(lane.idle))]
        quits = [loop.create_task(transport.quit()) for transport in idle]
        if quits:
            _, late = await asyncio.wait(quits, timeout=max(0.1, deadline - loop.time()))
            for task in late:
                task.cancel()
            for transport in idle:
                transport.close()

    def set_config(self, config: Config) -> None:
        self.config = config
        self._lanes.reconfigure(config)
        self.apply_credentials()
        self._release_unpaused_holds()

    def credentials_changed(self) -> None:
        """The token or password store changed (``relayd auth``, ``--revoke``, the connect
        page): sessions logged in before are not used again; resume what it fixes."""
        self._workers.credentials_changed(self._lanes)
        self.apply_credentials()
        self._release_unpaused_holds()

    # -- health -------------------------------------------------------------------------

    def health(self, address: str) -> AccountHealth:
        return self.book.get(address)

    def set_health(self, health: AccountHealth) -> None:
        before = self.book.get(health.address) if self.on_health is not None else None
        self.book.set(health)
        if self.on_health is not None and before is not None:
            self.on_health(before, health)
        if health.paused:
            self._hold_account(health.address)
            self._wake.set()  # the timer loop sets itself for this account's probe

    def apply_shared_pause(self, address: str, paused: bool, reason: str, host: str) -> None:
        """Another host of the fleet paused the account, or resumed it."""
        health = self.health(address)
        if paused and not health.paused:
            log.warning(
                "paused on fleet host %s (%s); holding its mail here too",
                host,
                reason,
                extra={"account": address},
            )
            self.set_health(health.on_paused_elsewhere(self.clock(), reason, host))
        elif not paused and health.paused and not health.operator_paused:
            log.info("resumed on fleet host %s; resuming here", host, extra={"account": address})
            self.set_health(health.on_released())
            self._release_unpaused_holds()

    def queue_counts(self) -> dict[str, tuple[int, int]]:
        """Per account: (messages waiting to be delivered, messages held)."""
        counts: dict[str, list[int]] = {}
        for _queue_id, tracked in self._tracked.items():
            if tracked.account is None or tracked.queue in (Queue.COPY, Queue.CORRUPT):
                continue
            entry = counts.setdefault(tracked.account, [0, 0])
            entry[1 if tracked.queue is Queue.HOLD else 0] += 1
        return {a: (q, h) for a, (q, h) in counts.items()}

    def apply_credentials(self) -> None:
        """A paused account whose credentials changed gets a fresh chance (SPEC)."""
        for account in known_accounts(self.config, (h.address for h in self.book)):
            before = self.health(account.address)
            consent = self.consent_of(account) if self.consent_of is not None else ""
            after = before.on_credentials_changed(credentials_fingerprint(account, consent))
            if before.paused and not after.paused:
                log.info("credentials changed; resuming", extra={"account": account.address})
            self.set_health(after)

    def _hold_account(self, address: str) -> None:
        """Move a paused account's waiting mail to hold/ (visible on disk, not attempted)."""
        lane = self._lanes.get(address)
        if lane is not None:
            while lane.ready:
                queue_id = lane.ready.popleft()
                tracked = self._tracked.get(queue_id)
                if tracked is not None:
                    tracked.in_line = False
                self.park(queue_id, Queue.HOLD, Queue.INCOMING)
        for queue_id in self.messages(Queue.DEFERRED, address):
            self.park(queue_id, Queue.HOLD, Queue.DEFERRED)

    def _release_unpaused_holds(self) -> None:
        """Held mail of accounts that are not paused (any more) goes back in line, unless the
        operator holds it."""
        for queue_id, tracked in self._tracked.items():
            if tracked.queue is not Queue.HOLD or tracked.account is None:
                continue
            if self.health(tracked.account).paused:
                continue
            if self.spool.read_state(queue_id).operator_hold:
                continue  # held with `relayd queue hold`: only `release` lets it go
            self.park(queue_id, Queue.INCOMING, Queue.HOLD)
            if queue_id in self._tracked:
                self._make_ready(queue_id, tracked.account)

    # -- intake -------------------------------------------------------------------------

    def knows(self, queue_id: str) -> bool:
        return queue_id in self._tracked

    def new_mail(self, queue_id: str, account: str | None = None) -> None:
        """Durable in ``incoming/`` and never attempted (a client got its 250, or relayd
        wrote it): queue it, unless it is known already (announced and found by a scan)."""
        if self._stopping or queue_id in self._tracked:
            return
        if account is None:
            account = self._account_in_file(queue_id, Queue.INCOMING)
            if account is None:
                return
        self._tracked.track(queue_id, Tracked(Queue.INCOMING, account, fresh=True))
        self._make_ready(queue_id, account)

    def requeued(self, queue_id: str) -> None:
        """Back in ``incoming/`` with a delivery state of its own: queue it."""
        if self._stopping:
            return
        tracked = self._tracked.get(queue_id)
        if tracked is not None and (tracked.in_line or tracked.queue is Queue.ACTIVE):
            return  # in line or being delivered already
        account = tracked.account if tracked is not None else None
        if account is None:
            account = self._account_in_file(queue_id, Queue.INCOMING)
            if account is None:
                return
        self._tracked.track(queue_id, Tracked(Queue.INCOMING, account))
        self._make_ready(queue_id, account)

    def _account_in_file(self, queue_id: str, queue: Queue) -> str | None:
        """The message's account, from its file; None (and quarantined) if it is damaged,
        None if it is gone."""
        try:
            msg = self.spool.load_if_present(queue_id, queue)
        except SpoolError as exc:
            self.spool.quarantine(queue_id, queue, str(exc))
            self._tracked.forget(queue_id)
            return None
        if msg is None:
            self._tracked.forget(queue_id)
            return None
        return msg.envelope.account

    def _reserve(self, queue_id: str, queue: Queue) -> bool:
        """Start-up intake: the message is known by name; its envelope is read later."""
        if queue_id in self._tracked:
            return False
        self._tracked.track(queue_id, Tracked(queue))
        return True

    def _take_read(self, read: SpoolRead) -> None:
        """Start-up intake: a reserved message's file has been read."""
        tracked = self._tracked.get(read.queue_id)
        if tracked is None or tracked.queue is not read.queue or tracked.account is not None:
            return  # moved or deleted meanwhile (an operator's command): no longer ours
        if read.problem is not None:
            self.spool.quarantine(read.queue_id, read.queue, read.problem)
            self.forget(read.queue_id)
            return
        account = read.account
        if account is None:
            self.forget(read.queue_id)
            return
        tracked.account = account
        if read.queue is Queue.INCOMING:
            if not self._stopping:
                self._make_ready(read.queue_id, account)
        elif read.queue is Queue.DEFERRED:
            due = read.state.next_attempt_at if read.state is not None else 0.0
            self._timers.add(read.queue_id, due)
            self._wake.set()

    def forget(self, queue_id: str) -> None:
        self._tracked.forget(queue_id)

    def _make_ready(self, queue_id: str, account: str) -> None:
        tracked = self._tracked.get(queue_id)
        assert tracked is not None
        tracked.queue, tracked.account, tracked.in_line = Queue.INCOMING, account, True
        lane = self._lanes.of(account)
        lane.ready.append(queue_id)
        self._workers.spawn(lane)

    # -- where messages go (the attempt's ``Parking``) -----------------------------------

    def park(self, queue_id: str, target: Queue, source: Queue = Queue.ACTIVE) -> bool:
        """Move a message; False if it is gone, or if the disk refused (then it stays in
        ``source`` and is looked at again a little later)."""
        if source is target:
            return True
        try:
            self.spool.move(queue_id, source, target)
        except FileNotFoundError:
            self.forget(queue_id)
            return False
        except OSError as exc:  # read-only, full, an I/O error: a per-message trouble
            self.retry_later(queue_id, source, f"cannot move it to {target}/: {exc}")
            return False
        tracked = self._tracked.get(queue_id)
        if tracked is not None:
            tracked.queue, tracked.troubles = target, 0
        return True

    def retry_later(self, queue_id: str, where: Queue, why: str) -> None:
        """The disk refused a step of this message: it stays in ``where`` and is taken up
        again after a short, growing wait (the timer loop), instead of being stranded."""
        tracked = self._tracked.get(queue_id) or self._tracked.track(queue_id, Tracked(where))
        tracked.queue, tracked.in_line = where, False
        tracked.troubles += 1
        wait = min(MAX_TROUBLE_WAIT, 2.0 ** min(tracked.troubles, 8))
        log.error("%s; trying again in %.0f s", why, wait, extra={"queue_id": queue_id})
        self._timers.add(queue_id, self.clock() + wait)
        self._wake.set()

    def defer(self, queue_id: str, due: float) -> None:
        if not self.park(queue_id, Queue.DEFERRED):
            return
        if queue_id in self._tracked:
            self._timers.add(queue_id, due)
            self._wake.set()

    # -- timers -------------------------------------------------------------------------

    async def _timer_loop(self) -> None:
        errors = 0
        while not self._stopping:
            try:
                delay = self._timer_round()
                errors = 0
            except Exception:
                # One round's trouble must not end retries for good (relayd.tasks.Vitals):
                # logged, and the next round comes a little later.
                errors += 1
                delay = min(MAX_TROUBLE_WAIT, 2.0**errors)
                log.exception("retry timer round failed; next round in %.0f s", delay)
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, delay))

    def _timer_round(self) -> float:
        """Due messages back in line, paused accounts probed; seconds until the next round."""
        now = self.clock()
        for queue_id in self._timers.due(now):
            tracked = self._tracked.get(queue_id)
            if tracked is None or tracked.busy or tracked.in_line:
                continue
            if tracked.queue is Queue.DEFERRED or tracked.queue is Queue.ACTIVE:
                # Its retry time came; or the disk refused to move it after an attempt, and
                # it is tried afresh (at-least-once).
                if self.park(queue_id, Queue.INCOMING, tracked.queue):
                    self.requeued(queue_id)
            elif tracked.queue is Queue.INCOMING:
                self.requeued(queue_id)  # the disk refused its move to active/
            # (held, or moved by the operator meanwhile: nothing to do)
        self._probe_paused(now)
        if self.book.unsaved:
            self.book.flush()
        delay = TIMER_TICK_SECONDS
        next_due = self._timers.next_due()
        if next_due is not None:
            delay = min(delay, next_due - now)
        if self.book.unsaved:
            delay = min(delay, HEALTH_SAVE_SECONDS)
        # SPEC: a paused account is probed every retry.max, on time rather than at the
        # next minute's tick. (A probe under way has moved nothing: its end wakes us.)
        probes = [
            h.retry_at
            for h in self.book
            if h.paused and not h.operator_paused and not h.paused_by and h.retry_at > now
        ]
        if probes:
            delay = min(delay, min(probes) - now)
        return delay

    # -- workers (relayd.queue.lanes) ---------------------------------------------------

    def _next_message(self, lane: Lane) -> str | None:
        queue_id = lane.ready.popleft()
        tracked = self._tracked.get(queue_id)
        if tracked is None or not tracked.in_line:
            return None  # withdrawn by an operator's command meanwhile
        tracked.in_line = False
        return queue_id

    async def _attempt(
        self, lane: Lane, queue_id: str, transport: Transport | None
    ) -> Transport | None:
        tracked = self._tracked.get(queue_id)
        assert tracked is not None
        fresh, tracked.fresh = tracked.fresh, False
        tracked.queue, tracked.busy = Queue.ACTIVE, True
        try:
            return await self._attempts.run(lane, queue_id, transport, fresh=fresh)
        except Exception:
            # A bug or the disk must not strand the message: it stays spooled and is retried.
            now = self._tracked.get(queue_id)
            if now is not None and now.queue is Queue.ACTIVE:
                now.busy = False
                self.defer(queue_id, self.clock() + self.config.spool.retry.first)
            raise
        finally:
            tracked.busy = False

    # -- paused accounts ----------------------------------------------------------------

    def _probe_paused(self, now: float) -> None:
        for health in self.book:
            if (
                not health.paused
                or health.operator_paused
                or health.needs_admin
                or now < health.retry_at
            ):
                continue
            if health.paused_by:
                continue  # paused on another host of the fleet, which probes
            lane = self._lanes.of(health.address)
            account = lane.account
            if lane.probing or account is None or account.is_capture:
                continue
            lane.probing = True
            self._tasks.spawn(self._probe(lane))

    async def _probe(self, lane: Lane) -> None:
        """SPEC: a paused account is probed with a login alone every retry.max."""
        assert lane.account is not None
        logx = {"account": lane.address}
        transport = self.deliverer.new_transport(lane.account)
        try:
            await transport.probe()
        except Exception as exc:
            retry_at = self.clock() + self.config.spool.retry.max
            self.set_health(self.health(lane.address).with_retry_at(retry_at))
            log.info("probe failed (%s); still paused", exc, extra=logx)
        else:
            log.info("probe login succeeded; resuming", extra=logx)
            self.set_health(self.health(lane.address).on_released())
            self._release_unpaused_holds()
        finally:
            lane.probing = False

    # -- the operator's commands (relayd.queue.commands: this is their QueueView) --------

    def where(self, queue_id: str) -> Queue | None:
        tracked = self._tracked.get(queue_id)
        return tracked.queue if tracked is not None else self.spool.locate(queue_id)

    def withdraw(self, queue_id: str) -> bool:
        tracked = self._tracked.get(queue_id)
        if tracked is None:
            return True
        if tracked.queue is Queue.ACTIVE:
            return False
        if tracked.in_line and tracked.account is not None:
            lane = self._lanes.get(tracked.account)
            if lane is not None and queue_id in lane.ready:
                lane.ready.remove(queue_id)
            tracked.in_line = False
        return True

    def messages(self, queue: Queue, account: str | None) -> list[str]:
        if queue in (Queue.COPY, Queue.CORRUPT):
            # Not the scheduler's: the filing stage's, or nobody's. Read from the spool.
            return StoppedQueue(self.spool).messages(queue, account)
        return self._tracked.in_queue(queue, account)

    def moved(self, queue_id: str, queue: Queue) -> None:
        tracked = self._tracked.get(queue_id)
        if queue is Queue.INCOMING:
            # Any file touched by a command has a delivery state now (or may have one).
            if tracked is not None:
                tracked.fresh = False
            self.requeued(queue_id)
            return
        if tracked is None:
            tracked = self._tracked.track(queue_id, Tracked(queue))
        tracked.queue, tracked.fresh = queue, False
        if tracked.account is None:
            tracked.account = self._account_in_file(queue_id, queue)

    def removed(self, queue_id: str) -> None:
        self.forget(queue_id)
