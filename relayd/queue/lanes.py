"""An account's lane: its ready queue, its connection slots and its sending pace.

Every account has a lane: a ready queue and at most ``limits.max_connections`` workers,
each keeping its transport open across messages (one login, many messages; Gmail answers
"454 Too many login attempts" to a login per message). A paused or unhealthy account's
lane does not run, so it never slows another account. The lane holds the account's
configuration, resolved once from its address and again at each reload, so an attempt does
not route the message anew.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from relayd.config.model import AccountConfig, Config
from relayd.core.routing import find_account
from relayd.core.throttle import Throttle
from relayd.tasks import TaskSet
from relayd.upstream.transport import Transport

__all__ = ["IDLE_SESSION_SECONDS", "RATE_WINDOW", "Lane", "LaneBudget", "LaneWorkers", "Lanes"]

log = logging.getLogger(__name__)

# max_messages_per_minute counts the messages started in the last minute.
RATE_WINDOW = 60.0
# A transport left without a message this long is closed (QUIT).
IDLE_SESSION_SECONDS = 30.0
# How long a worker waits for its session's QUIT before it gives its connection lease back.
QUIT_WAIT_SECONDS = 5.0


class LaneBudget(Protocol):
    """Budgets an account shares with other hosts (fleet mode, ``relayd.fleet.budgets``):
    leave for each connection, and the pace of message starts."""

    async def connection(self, address: str, limit: int, wanted: Callable[[], bool]) -> Any:
        """Leave for one connection (a permit), or None once ``wanted()`` is false."""
        ...

    def keep(self, permit: Any, limit: int) -> bool:
        """May the permit's connection carry one more message?"""
        ...

    async def release(self, permit: Any) -> None: ...

    async def pace(self, address: str, per_minute: int) -> float:
        """Seconds to wait before the next start; 0.0: start now (counted)."""
        ...

    def throttled(self, address: str, until: float) -> None:
        """The provider asked this lane to wait until ``until``: every host waits."""
        ...


@dataclass(eq=False)
class Lane:
    address: str
    account: AccountConfig | None  # None: the address is no longer configured
    ready: deque[str] = field(default_factory=deque)
    workers: int = 0
    idle: list[Transport] = field(default_factory=list)
    started_at: deque[float] = field(default_factory=deque)  # for the per-minute limit
    logins: int = 0
    probing: bool = False
    throttle: Throttle = field(default_factory=Throttle)  # the provider's "slow down"
    # Counts credential changes (a new consent, a revoked one, a new password): a session
    # logged in before the last one is not used again.
    credentials_epoch: int = 0

    @property
    def configured_connections(self) -> int:
        return max(1, self.account.limits.max_connections) if self.account is not None else 1

    @property
    def max_connections(self) -> int:
        return self.throttle.connection_limit(self.configured_connections)

    def wait_for_pace(self, now: float) -> float:
        """Seconds until the lane may start one more message: a throttle pause, or the
        per-minute limit; 0.0 means start now, and the start is counted."""
        paused = self.throttle.wait(now)
        if paused > 0:
            return paused
        per_minute = self.account.limits.max_messages_per_minute if self.account else 0
        if per_minute <= 0:
            return 0.0
        while self.started_at and self.started_at[0] <= now - RATE_WINDOW:
            self.started_at.popleft()
        if len(self.started_at) < per_minute:
            self.started_at.append(now)
            return 0.0
        return self.started_at[0] + RATE_WINDOW - now

    def take_idle(self) -> Transport | None:
        return self.idle.pop() if self.idle else None


class Lanes:
    def __init__(self, config: Config) -> None:
        self._config = config
        self._lanes: dict[str, Lane] = {}

    def of(self, address: str) -> Lane:
        lane = self._lanes.get(address)
        if lane is None:
            lane = self._lanes[address] = Lane(address, find_account(self._config, address))
        return lane

    def get(self, address: str) -> Lane | None:
        return self._lanes.get(address)

    def reconfigure(self, config: Config) -> None:
        self._config = config
        for lane in self._lanes.values():
            lane.account = find_account(config, lane.address)

    def __iter__(self) -> Iterator[Lane]:
        return iter(list(self._lanes.values()))


class LaneWorkers:
    """The workers of every lane: up to ``max_connections`` per account, each taking the
    lane's next message at the lane's pace and keeping its transport open between them.

    ``next_message(lane)``: the next queue id to attempt (None when the lane's line holds
    nothing to do); ``attempt(lane, queue id, transport)``: one attempt, returning the
    transport to keep.
    """

    def __init__(
        self,
        *,
        next_message: Callable[[Lane], str | None],
        attempt: Callable[[Lane, str, Transport | None], Awaitable[Transport | None]],
        clock: Callable[[], float],
        tasks: TaskSet,
        budget: LaneBudget | None = None,
    ) -> None:
        self.next_message = next_message
        self.attempt = attempt
        self.clock = clock
        self.tasks = tasks
        self.budget = budget
        self.stopping = False

    def spawn(self, lane: Lane) -> None:
        while lane.ready and lane.workers < lane.max_connections and not self.stopping:
            lane.workers += 1
            if self.budget is not None:
                self.tasks.spawn(self._work_shared(lane, self.budget))
            else:
                self.tasks.spawn(self._work(lane))

    def credentials_changed(self, lanes: Lanes) -> None:
        """The credentials changed (``relayd auth``, ``--revoke``, the connect page): sessions
        logged in with the old ones are closed, idle ones now, busy ones after their current
        message, so that nothing more goes out on a login the owner took back."""
        for lane in lanes:
            lane.credentials_epoch += 1
            while lane.idle:
                self.tasks.spawn(lane.idle.pop().quit())

    async def _work(self, lane: Lane) -> None:
        transport = lane.take_idle()
        epoch = lane.credentials_epoch
        try:
            while lane.ready and not self.stopping:
                pause = lane.wait_for_pace(self.clock())
                if pause > 0:
                    await asyncio.sleep(pause)
                    continue
                queue_id = self.next_message(lane)
                if queue_id is None:
                    continue
                transport, epoch = await self._attempt_one(
                    lane, queue_id, transport, epoch, wait_for_quit=False
                )
                if lane.workers > lane.max_connections:
                    break  # the lane was throttled to fewer connections: this one goes
        finally:
            lane.workers -= 1
            if transport is not None and epoch != lane.credentials_epoch:
                transport.close()  # logged in with credentials that have changed since
                transport = None
            if transport is not None and lane.workers + len(lane.idle) >= lane.max_connections:
                # Open connections count against the provider's limit, idle ones too.
                transport.close()
                transport = None
            if transport is not None and transport.is_open:
                lane.idle.append(transport)
                asyncio.get_running_loop().call_later(
                    IDLE_SESSION_SECONDS, self._close_idle, lane, transport
                )

    async def _work_shared(self, lane: Lane, budget: LaneBudget) -> None:
        """A worker of fleet mode: it opens its connection only with a permit from the
        fleet's budget, paces each start by the fleet's window, and closes its connection
        before it gives the permit back (no idle sessions: an idle one would hold a lease
        another host may need)."""
        transport: Transport | None = None
        permit: Any = None
        epoch = lane.credentials_epoch
        try:
            permit = await budget.connection(
                lane.address,
                lane.configured_connections,
                lambda: bool(lane.ready) and not self.stopping,
            )
            if permit is None:
                return
            while lane.ready and not self.stopping:
                if not budget.keep(permit, lane.configured_connections):
                    break
                pause = lane.throttle.wait(self.clock())
                if pause <= 0:
                    per_minute = lane.account.limits.max_messages_per_minute if lane.account else 0
                    pause = await budget.pace(lane.address, per_minute)
                if pause > 0:
                    await asyncio.sleep(pause)
                    continue
                queue_id = self.next_message(lane)
                if queue_id is None:
                    continue
                # The session's lease is held until its QUIT is done: waited for here.
                transport, epoch = await self._attempt_one(
                    lane, queue_id, transport, epoch, wait_for_quit=True
                )
                if lane.throttle.paused_until > self.clock():
                    budget.throttled(lane.address, lane.throttle.paused_until)
                if lane.workers > lane.max_connections:
                    break
        finally:
            lane.workers -= 1
            if transport is not None:
                await self._quit(transport)
            if permit is not None:
                await budget.release(permit)
                if lane.ready and not self.stopping:
                    self.spawn(lane)  # this one lost its permit: another asks for one

    async def _attempt_one(
        self,
        lane: Lane,
        queue_id: str,
        transport: Transport | None,
        epoch: int,
        *,
        wait_for_quit: bool,
    ) -> tuple[Transport | None, int]:
        """One message over the worker's session; returns the session to keep and the
        credentials epoch it was logged in under. A session from before the lane's last
        credential change is quit first, so nothing goes out on a login taken back."""
        if epoch != lane.credentials_epoch:
            if transport is not None:
                if wait_for_quit:
                    await self._quit(transport)
                else:
                    self.tasks.spawn(transport.quit())
                transport = None
            epoch = lane.credentials_epoch
        try:
            transport = await self.attempt(lane, queue_id, transport)
        except Exception:
            log.exception("delivery attempt failed unexpectedly", extra={"queue_id": queue_id})
            if transport is not None:
                transport.close()
                transport = None
        return transport, epoch

    @staticmethod
    async def _quit(transport: Transport) -> None:
        try:
            await asyncio.wait_for(transport.quit(), QUIT_WAIT_SECONDS)
        except TimeoutError:
            transport.close()
        except asyncio.CancelledError:
            transport.close()
            raise

    def _close_idle(self, lane: Lane, transport: Transport) -> None:
        if transport in lane.idle:
            lane.idle.remove(transport)
            self.tasks.spawn(transport.quit())
