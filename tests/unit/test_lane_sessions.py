"""A lane's sessions after a change of credentials (relayd.queue.lanes): none logged in with
the old ones carries another message, idle or busy."""

from __future__ import annotations

import asyncio
from typing import cast

from factories import make_account, make_config, make_tenant

from relayd.queue.lanes import Lane, Lanes, LaneWorkers
from relayd.tasks import TaskSet
from relayd.upstream.transport import Transport

ADDRESS = "alice@acme.example"


class Session:
    """A logged-in upstream session as the lane sees it."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.quits = 0
        self.closed = False

    @property
    def is_open(self) -> bool:
        return not self.closed and self.quits == 0

    async def quit(self) -> None:
        self.quits += 1

    def close(self) -> None:
        self.closed = True


async def test_sessions_logged_in_before_a_credentials_change_carry_no_more_mail() -> None:
    lanes = Lanes(make_config(tenants=[make_tenant("acme", accounts=[make_account(ADDRESS)])]))
    lane = lanes.of(ADDRESS)
    lane.ready.extend(["m1", "m2", "m3"])
    carried: list[tuple[str, int]] = []
    opened: list[Session] = []
    tasks = TaskSet()

    def next_message(lane: Lane) -> str | None:
        return lane.ready.popleft()

    async def attempt(lane: Lane, queue_id: str, transport: Transport | None) -> Transport:
        session = cast(Session | None, transport)
        if session is None:
            session = Session(len(opened) + 1)
            opened.append(session)
        carried.append((queue_id, session.number))
        if queue_id == "m1":
            # `relayd auth --revoke` while m1 was being sent on session 1.
            workers.credentials_changed(lanes)
        return cast(Transport, session)

    workers = LaneWorkers(
        next_message=next_message, attempt=attempt, clock=lambda: 0.0, tasks=tasks
    )
    workers.spawn(lane)
    while lane.workers:
        await asyncio.sleep(0)
    await tasks.drain(timeout=1.0)
    # Session 1 was busy at the change: it finished m1, then was let go (QUIT); m2 and m3
    # went on a new login.
    assert carried == [("m1", 1), ("m2", 2), ("m3", 2)]
    assert opened[0].quits == 1
    assert [cast(Session, t).number for t in lane.idle] == [2]
    # An idle session goes at once.
    workers.credentials_changed(lanes)
    await tasks.drain(timeout=1.0)
    assert lane.idle == [] and opened[1].quits == 1
