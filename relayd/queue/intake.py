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
from collections.abc import Callable
from dataclasses import dataclass

from relayd.core.envelope import DeliveryState, Envelope
from relayd.core.queues import AT_START, Queue
from relayd.errors import SpoolError
from relayd.spool.store import Spool

__all__ = ["SpoolIntake", "SpoolRead"]

log = logging.getLogger(__name__)

_BATCH = 512


@dataclass(frozen=True)
class SpoolRead:
    """What the intake found in one file."""

    queue_id: str
    queue: Queue
    envelope: Envelope | None  # None: gone meanwhile, or damaged
    state: DeliveryState | None  # deferred/ only
    problem: str | None = None  # the file is damaged

    @property
    def account(self) -> str | None:
        # 100,000 messages, a handful of accounts: one string each.
        return sys.intern(self.envelope.account) if self.envelope is not None else None


def _read_batch(spool: Spool, batch: list[tuple[str, Queue]]) -> list[SpoolRead]:
    found: list[SpoolRead] = []
    for queue_id, queue in batch:
        try:
            msg = spool.load_if_present(queue_id, queue)
        except SpoolError as exc:
            found.append(SpoolRead(queue_id, queue, None, None, str(exc)))
            continue
        if msg is None:
            found.append(SpoolRead(queue_id, queue, None, None))
            continue
        state = spool.read_state(queue_id) if queue is Queue.DEFERRED else None
        found.append(SpoolRead(queue_id, queue, msg.envelope, state))
    return found


class SpoolIntake:
    """``take(read)`` is told what each file holds, ``done()`` when all are read."""

    def __init__(
        self,
        spool: Spool,
        *,
        take: Callable[[SpoolRead], None],
        done: Callable[[], None],
    ) -> None:
        self.spool = spool
        self.take = take
        self.done = done
        self._waiting: deque[tuple[str, Queue]] = deque()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return len(self._waiting)

    def list_spool(self, reserve: Callable[[str, Queue], bool]) -> int:
        """Names only: ``reserve`` makes each queued message known; the count listed."""
        for queue in AT_START:
            for name in sorted(os.listdir(self.spool.directory(queue))):  # oldest first
                if reserve(name, queue):
                    self._waiting.append((name, queue))
        return len(self._waiting)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        total = len(self._waiting)
        while self._waiting:
            batch = [self._waiting.popleft() for _ in range(min(_BATCH, len(self._waiting)))]
            try:
                found = await asyncio.to_thread(_read_batch, self.spool, batch)
            except Exception:
                log.exception("reading the spool at start failed; retrying")
                self._waiting.extendleft(reversed(batch))
                await asyncio.sleep(1.0)
                continue
            for item in found:
                self.take(item)
        if total:
            log.info("spool read: %d queued messages taken in", total)
        self.done()
