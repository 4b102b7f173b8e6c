"""Background tasks a component owns: kept alive, drained when it stops, and watched.

The event loop holds only weak references to tasks (asyncio docs, ``create_task``): a task
nobody references may be collected mid-run. Each component that starts work in the
background (delivery workers, IMAP filings, alerts, logouts) keeps its tasks in a
``TaskSet`` until they end, and waits for them, within a time limit, when it stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator
from typing import Any

__all__ = ["TaskSet", "Vitals", "vitals"]

log = logging.getLogger(__name__)


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

    async def drain(
        self, timeout: float, *, cancel_late: bool = False, unwind: float = 1.0
    ) -> None:
        """Wait up to ``timeout`` seconds for every task; with ``cancel_late``, cancel the
        ones still running then, and give them ``unwind`` seconds to unwind."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=max(0.0, timeout))
        if cancel_late and pending:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=unwind)


class Vitals:
    """The daemon's long-lived tasks (timers, scans, watchers), and whether one has died.

    Each such loop catches and logs the errors of one message or one round and carries on
    (a read-only disk for a few seconds must not end retries for good). If a loop still
    dies of an exception, that is logged at once with its traceback and the daemon is
    *degraded*: ``/healthz`` answers 503, ``relayd status``
    says why, and the watchdog pings stop, so that systemd restarts the daemon
    (``WatchdogSec=``) rather than leaving it running without, say, its retries.
    """

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[Any]] = {}
        self._died: dict[str, str] = {}
        self._stopping = False

    def start(self, name: str, work: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks[name] = task
        task.add_done_callback(lambda t: self._ended(name, t))
        return task

    def _ended(self, name: str, task: asyncio.Task[Any]) -> None:
        if self._tasks.get(name) is task:
            del self._tasks[name]
        if task.cancelled() or self._stopping:
            return
        exc = task.exception()
        if exc is None:
            return  # a loop ends when its component stops
        why = f"{name} stopped: {exc!r}"
        self._died[name] = why
        log.critical("%s; the daemon is degraded and asks to be restarted", why, exc_info=exc)

    def stopping(self) -> None:
        """From now on tasks end on purpose."""
        self._stopping = True

    @property
    def degraded(self) -> list[str]:
        """Why the daemon is degraded (empty: it is not)."""
        return sorted(self._died.values())


vitals = Vitals()
