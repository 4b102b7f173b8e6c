"""Per-mailbox budgets shared by the fleet: connection leases, the per-minute window and
the provider's back-off.

- A connection needs a lease: one of ``max_connections`` slot rows of the account, held
  until its expiry (the database's clock), renewed every third of ``fleet.lease_time``. A
  host that dies stops renewing, and its slots are free again after the lease time. The
  holder trusts a lease for less than that (``relayd.core.budget.lease_trusted_until``).
- A message start takes a place in the account's sliding window: at most
  ``max_messages_per_minute`` starts in any ``FLEET_RATE_WINDOW``, counted per second in
  ``fleet_sends`` (at most a window's worth of rows per account, however many starts) under
  the account's advisory lock.
- A throttle reply on any host pauses the account's lane on every host until then.

While the database is unreachable, each host keeps to ``local_share`` of each limit: its
connections (leases it still trusts count), and starts in a window that begins with every
start the fleet had made as last seen, so the minute the database went away is counted too.
The changes of mode are where a fleet could overshoot, so:

- going offline, a host opens no connection of its local share before ``lease_time`` has
  passed: by then every lease any host held has run out of trust, and its holder keeps at
  most its share of those connections (``keep``);
- coming back, a host first turns its local connections into leases (``reconnected``) and
  writes the starts it made meanwhile; new leases wait ``SETTLE_SECONDS``, time for every
  host to notice the database is back and register its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from psycopg import AsyncConnection

from relayd.core.budget import (
    FLEET_RATE_WINDOW,
    lease_trusted_until,
    local_share,
    second_of,
    wait_in_buckets,
)
from relayd.fleet.database import FleetDatabase
from relayd.fleet.errors import FleetUnavailable
from relayd.tasks import TaskSet

__all__ = ["BUDGET_LOCK", "FleetBudgets", "Permit"]

log = logging.getLogger(__name__)

# pg_advisory_xact_lock(BUDGET_LOCK, hashtext(account)): one window update at a time (the
# schema's fleet_take_start takes the same lock).
BUDGET_LOCK = 0x627564  # "bud"
# How often a worker without a connection lease asks again.
LEASE_POLL_SECONDS = 0.5
# After the database is back (or at start), how long before new leases are handed out:
# every host notices within its check interval plus a connection timeout.
SETTLE_SECONDS = 5.0

_DB_NOW = "extract(epoch from clock_timestamp())"


@dataclass(eq=False)
class Permit:
    """Leave to keep one connection open for ``account``: a lease (``slot``), or while the
    database is unreachable a place in this host's local share (``slot`` None)."""

    account: str
    slot: int | None
    lease_id: str
    trusted_until: float = 0.0
    lost: bool = False


@dataclass
class _Account:
    permits: set[Permit] = field(default_factory=set)
    # The fleet's starts per second, as last seen (and this host's since, while offline).
    recent: dict[int, int] = field(default_factory=dict)
    unsynced: dict[int, int] = field(default_factory=dict)  # this host's starts while offline
    limit: int = 1  # max_connections, as the lane last asked
    throttled_until: float = 0.0
    shared_throttle: float = 0.0  # the latest pause told to the fleet


class FleetBudgets:
    def __init__(
        self,
        db: FleetDatabase,
        *,
        lease_time: float,
        hosts_seen: Callable[[], int],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.lease_time = lease_time
        self.hosts_seen = hosts_seen
        self.clock = clock
        self._accounts: dict[str, _Account] = {}
        self._tasks = TaskSet()

    def _of(self, address: str) -> _Account:
        found = self._accounts.get(address)
        if found is None:
            found = self._accounts[address] = _Account()
        return found

    # -- connections ----------------------------------------------------------------------

    async def connection(
        self, address: str, limit: int, wanted: Callable[[], bool]
    ) -> Permit | None:
        """Wait for leave to open a connection; None once ``wanted()`` says no more."""
        self._of(address).limit = max(1, limit)
        while wanted():
            permit = await self._try_connection(address, max(1, limit))
            if permit is not None:
                self._of(address).permits.add(permit)
                return permit
            await asyncio.sleep(LEASE_POLL_SECONDS * (0.5 + random.random()))
        return None

    async def _try_connection(self, address: str, limit: int) -> Permit | None:
        now = self.clock()
        if self.db.online:
            back = self.db.online_since
            if back is not None and now - back < SETTLE_SECONDS:
                return None
            with contextlib.suppress(FleetUnavailable):
                return await self._lease(address, limit)
        away = self.db.offline_since
        if away is None or now - away < self.lease_time:
            return None  # leases held elsewhere may still be trusted by their holders
        if len(self._usable_permits(address)) < local_share(limit, self.hosts_seen()):
            return Permit(address, None, secrets.token_hex(8))
        return None

    async def _lease(self, address: str, limit: int) -> Permit | None:
        lease_id = secrets.token_hex(8)
        sent_at = self.clock()
        async with self.db.connection() as conn:
            await conn.execute(
                "INSERT INTO fleet_leases (account, slot)"
                " SELECT %s, g FROM generate_series(0, %s - 1) AS g ON CONFLICT DO NOTHING",
                (address, limit),
            )
            cur = await conn.execute(
                "UPDATE fleet_leases SET holder = %s, lease_id = %s,"
                f" expires_at = {_DB_NOW} + %s"
                " WHERE (account, slot) = ("
                "  SELECT account, slot FROM fleet_leases"
                f"  WHERE account = %s AND slot < %s AND expires_at < {_DB_NOW}"
                "  ORDER BY slot LIMIT 1 FOR UPDATE SKIP LOCKED)"
                " RETURNING slot",
                (self.db.name, lease_id, self.lease_time, address, limit),
            )
            row = await cur.fetchone()
        if row is None:
            return None
        return Permit(address, int(row[0]), lease_id, lease_trusted_until(sent_at, self.lease_time))

    def _usable_permits(self, address: str, but: Permit | None = None) -> list[Permit]:
        now = self.clock()
        return [
            p
            for p in self._of(address).permits
            if p is not but and not p.lost and (p.slot is None or now < p.trusted_until)
        ]

    def keep(self, permit: Permit, limit: int) -> bool:
        """May the connection of ``permit`` carry one more message?"""
        if permit.lost:
            return False
        if permit.slot is None:
            # A local share, taken while the database was away; ``reconnected`` makes it a
            # lease (or lost) once the database is back.
            return True
        if self.clock() < permit.trusted_until:
            return True
        if self.db.online:
            return False  # not renewed in time: another host may hold it by now
        if len(self._usable_permits(permit.account, but=permit)) < local_share(
            limit, self.hosts_seen()
        ):
            permit.slot = None  # carried on as a local share
            return True
        return False

    async def release(self, permit: Permit) -> None:
        """The connection is closed: its lease is free for any host at once."""
        self._of(permit.account).permits.discard(permit)
        if permit.slot is None or permit.lost or not self.db.online:
            return
        with contextlib.suppress(FleetUnavailable):
            async with self.db.connection() as conn:
                await conn.execute(
                    "UPDATE fleet_leases SET holder = NULL, lease_id = NULL, expires_at = 0"
                    " WHERE account = %s AND slot = %s AND lease_id = %s",
                    (permit.account, permit.slot, permit.lease_id),
                )

    async def reconnected(self) -> None:
        """The database is back: this host's local connections become leases (or close
        after their message, if the slots are taken), and its starts made meanwhile join the
        fleet's window."""
        for address, state in list(self._accounts.items()):
            if state.unsynced:
                async with self.db.connection() as conn, conn.transaction():
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (BUDGET_LOCK, address)
                    )
                    await self._add_starts(conn, address, state.unsynced)
                state.unsynced.clear()
            for permit in list(state.permits):
                if permit.slot is not None or permit.lost:
                    continue
                leased = await self._lease(address, max(1, state.limit))
                if leased is None:
                    permit.lost = True
                else:
                    permit.slot, permit.lease_id = leased.slot, leased.lease_id
                    permit.trusted_until = leased.trusted_until

    async def renew(self) -> None:
        """Extend every lease this host holds (the fleet loop calls it every third of the
        lease time); a lease the database no longer gives this host is lost."""
        held = [
            p
            for a in self._accounts.values()
            for p in a.permits
            if p.slot is not None and not p.lost
        ]
        if not held:
            return
        sent_at = self.clock()
        async with self.db.connection() as conn:
            cur = await conn.execute(
                f"UPDATE fleet_leases SET expires_at = {_DB_NOW} + %s"
                f" WHERE holder = %s AND lease_id = ANY(%s) AND expires_at >= {_DB_NOW}"
                " RETURNING lease_id",
                (self.lease_time, self.db.name, [p.lease_id for p in held]),
            )
            renewed = {str(r[0]) for r in await cur.fetchall()}
        for permit in held:
            if permit.lease_id in renewed:
                permit.trusted_until = lease_trusted_until(sent_at, self.lease_time)
            else:
                permit.lost = True
                log.warning(
                    "connection lease of %s expired before it was renewed; closing that connection",
                    permit.account,
                )

    # -- messages per minute and the provider's back-off -----------------------------------

    async def pace(self, address: str, per_minute: int) -> float:
        """Seconds before the account may start another message on this host; 0.0: start
        now (and it is counted)."""
        state = self._of(address)
        now = self.clock()
        if state.throttled_until > now:
            return state.throttled_until - now
        if per_minute <= 0:
            return 0.0
        if self.db.online:
            with contextlib.suppress(FleetUnavailable):
                return await self._take_start(address, per_minute, now, state)
        share = local_share(per_minute, self.hosts_seen())
        oldest = second_of(now - FLEET_RATE_WINDOW) - 1
        state.recent = {s: n for s, n in state.recent.items() if s >= oldest}
        wait = wait_in_buckets(state.recent, share, now, FLEET_RATE_WINDOW)
        if wait == 0.0:
            second = second_of(now)
            state.recent[second] = state.recent.get(second, 0) + 1
            state.unsynced[second] = state.unsynced.get(second, 0) + 1
        return wait

    @staticmethod
    async def _add_starts(conn: AsyncConnection, address: str, starts: dict[int, int]) -> None:
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO fleet_sends (account, second, starts) VALUES (%s, %s, %s)"
                " ON CONFLICT (account, second) DO UPDATE"
                " SET starts = fleet_sends.starts + excluded.starts",
                [(address, second, n) for second, n in sorted(starts.items())],
            )

    async def _take_start(
        self, address: str, per_minute: int, now: float, state: _Account
    ) -> float:
        async with self.db.connection() as conn:
            if state.unsynced:
                async with conn.transaction():
                    await conn.execute(
                        "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (BUDGET_LOCK, address)
                    )
                    await self._add_starts(conn, address, state.unsynced)
                state.unsynced.clear()
            cur = await conn.execute(
                "SELECT wait, seconds, counts FROM"
                " fleet_take_start(%s::text, %s::float8, %s::integer, %s::float8)",
                (address, now, per_minute, FLEET_RATE_WINDOW),
            )
            row = await cur.fetchone()
        assert row is not None
        wait = float(row[0])
        state.recent = dict(zip(row[1] or (), row[2] or (), strict=True))
        return wait

    def throttled(self, address: str, until: float) -> None:
        """A throttle reply here: every host's lane for the account waits until ``until``."""
        state = self._of(address)
        state.throttled_until = max(state.throttled_until, until)
        if until <= state.shared_throttle:
            return
        state.shared_throttle = until
        self._tasks.spawn(self._share_throttle(address, until))

    async def _share_throttle(self, address: str, until: float) -> None:
        with contextlib.suppress(FleetUnavailable):
            async with self.db.connection() as conn:
                await conn.execute(
                    "INSERT INTO fleet_throttle (account, paused_until) VALUES (%s, %s)"
                    " ON CONFLICT (account) DO UPDATE SET paused_until ="
                    " greatest(fleet_throttle.paused_until, excluded.paused_until)",
                    (address, until),
                )

    async def refresh_throttles(self) -> None:
        """The back-off other hosts were told (for accounts without a per-minute limit,
        whose starts do not read it)."""
        now = self.clock()
        async with self.db.connection() as conn:
            cur = await conn.execute(
                "SELECT account, paused_until FROM fleet_throttle WHERE paused_until > %s",
                (now,),
            )
            for account, until in await cur.fetchall():
                state = self._of(str(account))
                state.throttled_until = max(state.throttled_until, float(until))
