"""Fleet mode in the running daemon: the database's upkeep beside delivery.

``FleetService`` builds the fleet's parts (``relayd.fleet``) and keeps them current in the
background: whether the database is reachable (and resumes shared accounting when it is
back), the heartbeat with this host's queues, the renewal of connection leases, pauses made
elsewhere applied here, and this host's pauses told to the others — in order, through one
queue, so that the alert of a pause is sent by the one host that began it.

Nothing here is on the accept path; every database call has a short timeout, and a failure
only means "go on locally".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from relayd.config.model import AccountConfig, Config, FleetConfig
from relayd.core.health import AccountHealth
from relayd.fleet.budgets import FleetBudgets
from relayd.fleet.database import FleetDatabase
from relayd.fleet.errors import FleetUnavailable
from relayd.fleet.health import FleetHealth
from relayd.fleet.hosts import FleetHosts
from relayd.fleet.tokens import FleetTokens
from relayd.ops.service import AlertChannel, OperatorEvents
from relayd.queue.scheduler import Scheduler
from relayd.tasks import TaskSet

__all__ = ["FleetOperatorEvents", "FleetService"]

log = logging.getLogger(__name__)

SYNC_SECONDS = 1.0  # pauses elsewhere, reachability
BEAT_SECONDS = 5.0  # heartbeat and queue counts


@dataclass(frozen=True)
class _Publish:
    account: str
    paused: bool
    reason: str
    alert: Callable[[], None] | None = None  # sent if this host began the incident


class FleetService:
    def __init__(self, fleet: FleetConfig, state_directory: Path, started_at: float) -> None:
        self.config = fleet
        self.started_at = started_at
        self.db = FleetDatabase(fleet)
        self.tokens = FleetTokens(self.db)
        self.hosts = FleetHosts(self.db, state_directory)
        self.budgets = FleetBudgets(
            self.db, lease_time=fleet.lease_time, hosts_seen=self.hosts.hosts_seen
        )
        self.health = FleetHealth(self.db)
        self.scheduler: Scheduler | None = None
        self._publishing: asyncio.Queue[_Publish] = asyncio.Queue()
        self._pending: list[_Publish] = []
        self._applying = False
        self._first_read = True
        self._tasks = TaskSet()
        self._loops: list[asyncio.Task[None]] = []
        # Called when a consent changed on some host (`relayd auth`, `--revoke`): cached
        # tokens are dropped and sessions logged in with them are not used again.
        self.on_consent_changed: Callable[[], None] | None = None
        self._consents: dict[str, str] | None = None

    # -- what the scheduler tells ----------------------------------------------------------

    def health_changed(self, before: AccountHealth, after: AccountHealth) -> None:
        if self._applying or before.paused == after.paused:
            return
        if after.paused and (after.paused_by or after.operator_paused):
            return  # applied from the fleet, or the operator's own pause of this host
        self._publishing.put_nowait(_Publish(after.address, after.paused, after.reason))

    def alert_once(self, account: AccountConfig, reason: str, alert: Callable[[], None]) -> None:
        """A pause began on this host: tell the fleet, and alert unless another host's
        pause of the account came first (it alerted)."""
        self._publishing.put_nowait(
            _Publish(account.address, True, f"credentials refused: {reason}", alert)
        )

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        await self.db.open()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.db.check(), 5.0)
        if not self.db.online:
            log.warning(
                "fleet database not reachable at start: delivering on local shares for %d "
                "hosts until it is",
                self.hosts.hosts_seen(),
            )
        loop = asyncio.get_running_loop()
        self._loops = [
            loop.create_task(self._sync_loop()),
            loop.create_task(self._publish_loop()),
            loop.create_task(self._renew_loop()),
        ]

    async def stop(self) -> None:
        for task in self._loops:
            task.cancel()
        for task in self._loops:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self._tasks.drain(2.0, cancel_late=True, unwind=0.5)
        await self.db.close()

    # -- the loops --------------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        last_beat = 0.0
        while True:
            try:
                if not self.db.online and await self.db.check():
                    await self.budgets.reconnected()
                if self.db.online:
                    await self._flush_pending()
                    await self._apply_changes()
                    now = time.monotonic()
                    if now - last_beat >= BEAT_SECONDS:
                        await self._beat()
                        last_beat = now
            except FleetUnavailable:
                pass  # marked offline; the next round checks again
            except Exception:
                log.exception("fleet sync round failed; trying again")
            await asyncio.sleep(SYNC_SECONDS)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease_time / 3.0)
            if not self.db.online:
                continue
            try:
                await self.budgets.renew()
            except FleetUnavailable:
                pass
            except Exception:
                log.exception("lease renewal failed; trying again")

    async def _publish_loop(self) -> None:
        while True:
            item = await self._publishing.get()
            await self._publish(item)

    async def _publish(self, item: _Publish) -> None:
        if not self.db.online:
            self._pending.append(item)
            if item.alert is not None:
                item.alert()  # the others cannot be asked: better twice than never
                self._pending[-1] = _Publish(item.account, item.paused, item.reason)
            return
        try:
            began = await self.health.publish(item.account, item.paused, item.reason)
        except FleetUnavailable:
            self._pending.append(item)
            return
        if item.alert is not None:
            if began:
                item.alert()
            else:
                log.info(
                    "pause already known to the fleet: its alert was sent by the host that "
                    "paused first",
                    extra={"account": item.account},
                )

    async def _flush_pending(self) -> None:
        pending, self._pending = self._pending, []
        for item in pending:
            await self._publish(item)

    async def _apply_changes(self) -> None:
        changes = await self.health.changes()
        first, self._first_read = self._first_read, False
        scheduler = self.scheduler
        if scheduler is None:
            return
        self._applying = True
        try:
            for change in changes:
                if change.host == self.db.name:
                    continue
                if first and not change.paused:
                    continue  # an old resume says nothing about a pause kept here
                scheduler.apply_shared_pause(
                    change.account, change.paused, change.reason, change.host
                )
        finally:
            self._applying = False

    async def _beat(self) -> None:
        scheduler = self.scheduler
        queues = scheduler.queue_counts() if scheduler is not None else {}
        await self.hosts.beat(queues, self.started_at)
        await self.budgets.refresh_throttles()
        consents = await self.tokens.consent_ids()
        if self._consents is not None and consents != self._consents:
            log.info("a consent changed on a host of the fleet: logging in afresh")
            if self.on_consent_changed is not None:
                self.on_consent_changed()
        self._consents = consents


class FleetOperatorEvents(OperatorEvents):
    """Alerts as ever, but a pause's alert once for the whole fleet."""

    def __init__(
        self, alerter: AlertChannel, config: Callable[[], Config], fleet: FleetService
    ) -> None:
        super().__init__(alerter, config)
        self.fleet = fleet

    def account_paused(self, account: AccountConfig, reason: str) -> None:
        def send() -> None:
            OperatorEvents.account_paused(self, account, reason)

        self.fleet.alert_once(account, reason, send)
