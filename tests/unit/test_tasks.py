"""Background tasks owned by a component: kept until done, drained at stop."""

from __future__ import annotations

import asyncio

from relayd.tasks import TaskSet


async def test_a_spawned_task_is_kept_until_it_ends() -> None:
    tasks = TaskSet()
    gate = asyncio.Event()
    task = tasks.spawn(gate.wait())
    assert len(tasks) == 1 and list(tasks) == [task]
    gate.set()
    await task
    await asyncio.sleep(0)  # the done callback runs after the task's end
    assert len(tasks) == 0


async def test_drain_waits_and_only_cancels_what_is_late_when_asked() -> None:
    tasks = TaskSet()
    quick = tasks.spawn(asyncio.sleep(0.01))
    slow = tasks.spawn(asyncio.sleep(30))
    await tasks.drain(0.2)
    assert quick.done() and not slow.done()
    await tasks.drain(0.01, cancel_late=True)
    assert slow.cancelled()
    await tasks.drain(0.01)  # nothing left: returns at once
