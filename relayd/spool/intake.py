"""How the scheduler takes in what is already in the spool when relayd starts.

Before ``READY=1`` only names are listed, so a start with 100,000 queued messages takes a
fraction of a second: every message is known by its queue id and queue at once (``relayd
queue``, the scan of ``incoming/`` and new arrivals see it), and its envelope is read after
``READY``, in batches, in a thread. Only then does the message join its account's lane (or,
when deferred, the timer heap with its delivery state's next attempt). A damaged file is
quarantined when its turn comes, and never sent: the attempt checks the file again anyway.

Postfix's qmgr likewise scans its queue directories and reads queue files as it goes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from relayd.core.envelope import DeliveryState, Envelope
from relayd.errors import SpoolError
from relayd.spool.store import Spool

if TYPE_CHECKING:
    from relayd.spool.scheduler import Scheduler

__all__ = ["SpoolIntake"]

log = logging.getLogger(__name__)

# Queues whose messages the scheduler owns at start (copy/ belongs to the filing stage).
QUEUES_AT_START = ("incoming", "deferred", "hold")
_BATCH = 512


@dataclass(frozen=True)
class _Read:
    queue_id: str
    queue: str
    envelope: Envelope | None  # None: gone meanwhile
    state: DeliveryState | None  # deferred/ only
    problem: str | None = None  # the file is damaged


def _read_batch(spool: Spool, batch: list[tuple[str, str]]) -> list[_Read]:
    found: list[_Read] = []
    for queue_id, queue in batch:
        try:
            msg = spool.load_if_present(queue_id, queue)
        except SpoolError as exc:
            found.append(_Read(queue_id, queue, None, None, str(exc)))
            continue
        if msg is None:
            found.append(_Read(queue_id, queue, None, None))
            continue
        state = spool.read_state(queue_id) if queue == "deferred" else None
        found.append(_Read(queue_id, queue, msg.envelope, state))
    return found


class SpoolIntake:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._waiting: deque[tuple[str, str]] = deque()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return len(self._waiting)

    def list_spool(self) -> int:
        """Names only: every queued message becomes known to the scheduler; the count."""
        spool = self.scheduler.spool
        for queue in QUEUES_AT_START:
            for name in sorted(os.listdir(spool.root / queue)):  # oldest first
                if self.scheduler.reserve(name, queue):
                    self._waiting.append((name, queue))
        return len(self._waiting)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        spool = self.scheduler.spool
        total = len(self._waiting)
        while self._waiting:
            batch = [self._waiting.popleft() for _ in range(min(_BATCH, len(self._waiting)))]
            try:
                found = await asyncio.to_thread(_read_batch, spool, batch)
            except Exception:
                log.exception("reading the spool at start failed; retrying")
                self._waiting.extendleft(reversed(batch))
                await asyncio.sleep(1.0)
                continue
            for item in found:
                self._take(item)
        if total:
            log.info("spool read: %d queued messages taken in", total)
        self.scheduler.intake_done()

    def _take(self, item: _Read) -> None:
        scheduler = self.scheduler
        if not scheduler.is_reserved(item.queue_id, item.queue):
            return  # moved or deleted meanwhile (an operator's command): no longer ours
        if item.problem is not None:
            scheduler.spool.quarantine(item.queue_id, item.queue, item.problem)
            scheduler.forget(item.queue_id)
            return
        if item.envelope is None:
            scheduler.forget(item.queue_id)
            return
        account = sys.intern(item.envelope.account)  # 100,000 messages, a handful of accounts
        scheduler.place(item.queue_id, item.queue, account, item.state)
