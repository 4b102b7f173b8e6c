"""What the scheduler knows of each message it owns: its queue, its account, its place in line.

One record per queue id instead of a set or dict per fact: a message is in exactly one
queue, and the facts that matter for its next step travel together. The spool on disk stays
the record; this is the scheduler's memory of it, rebuilt from the spool at every start.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from relayd.core.queues import Queue

__all__ = ["Tracked", "Tracker"]


@dataclass(slots=True)
class Tracked:
    queue: Queue
    account: str | None = None  # None while only its name is known (start-up intake)
    fresh: bool = False  # accepted since the start and never attempted: no state file
    in_line: bool = False  # waiting in its lane's ready queue
    busy: bool = False  # an attempt of it is under way
    troubles: int = 0  # moves the disk refused in a row (read-only, full): for the back-off


class Tracker:
    def __init__(self) -> None:
        self._messages: dict[str, Tracked] = {}

    def __contains__(self, queue_id: str) -> bool:
        return queue_id in self._messages

    def get(self, queue_id: str) -> Tracked | None:
        return self._messages.get(queue_id)

    def track(self, queue_id: str, tracked: Tracked) -> Tracked:
        self._messages[queue_id] = tracked
        return tracked

    def forget(self, queue_id: str) -> None:
        self._messages.pop(queue_id, None)

    def items(self) -> Iterator[tuple[str, Tracked]]:
        return iter(list(self._messages.items()))

    def in_queue(self, queue: Queue, account: str | None = None) -> list[str]:
        """Queue ids in ``queue`` (of ``account`` only, unless None), oldest first."""
        return sorted(
            queue_id
            for queue_id, tracked in self._messages.items()
            if tracked.queue is queue and (account is None or tracked.account == account)
        )
