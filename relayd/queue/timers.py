"""Deferred mail by due time: one heap for every account (Postfix's deferred queue scan).

Pure bookkeeping, no I/O and no clock of its own: the scheduler's timer loop asks which
messages are due and moves them back to ``incoming/``. An entry is a hint, not the record:
the scheduler checks that a popped message is still deferred (an operator may have held,
flushed or deleted it meanwhile), so stale entries cost nothing but a comparison.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

__all__ = ["RetryTimers"]


class RetryTimers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, queue_id: str, due: float) -> None:
        heapq.heappush(self._heap, (due, queue_id))

    def due(self, now: float) -> Iterator[str]:
        """Take out, oldest first, every entry due at ``now``."""
        while self._heap and self._heap[0][0] <= now:
            yield heapq.heappop(self._heap)[1]

    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def make_due(self, queue_ids: set[str] | None = None) -> int:
        """Due now: every entry, or those of ``queue_ids``; the number changed."""
        changed = 0
        heap = []
        for due, queue_id in self._heap:
            if queue_ids is None or queue_id in queue_ids:
                due, changed = 0.0, changed + 1
            heap.append((due, queue_id))
        heapq.heapify(heap)
        self._heap = heap
        return changed
