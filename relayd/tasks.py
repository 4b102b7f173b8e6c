"""Background tasks a component owns: kept alive, and drained when it stops.

The event loop holds only weak references to tasks (asyncio docs, ``create_task``): a task
nobody references may be collected mid-run. Each component that starts work in the
background (delivery workers, IMAP filings, alerts, logouts) keeps its tasks in a
``TaskSet`` until they end, and waits for them, within a time limit, when it stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any

__all__ = ["TaskSet"]


class TaskSet:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        return self.keep(asyncio.get_running_loop().create_task(work))

    def keep(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(set(self._tasks))

    def __len__(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout: float, *, cancel_late: bool = False) -> None:
        """Wait up to ``timeout`` seconds for every task; with ``cancel_late``, cancel the
        ones still running then, and give them a few seconds to unwind."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        if cancel_late and pending:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=5)
