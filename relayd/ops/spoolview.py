"""Reading the spool as an operator sees it: what is queued where, for whom, since when.

Read-only and safe while the daemon runs: a message's state is the directory it is in and
every change is a rename, so a file that vanishes between listing and reading simply moved
on (it is skipped). The account of a queue id never changes, so ``QueueCensus`` reads each
message's envelope once and then only lists directories.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relayd.core.envelope import DeliveryState, Envelope
from relayd.core.health import AccountHealth, AccountState
from relayd.core.queues import WAITING, Queue
from relayd.errors import SpoolError
from relayd.spool.store import Spool

__all__ = [
    "NextTry",
    "QueueCensus",
    "QueueEntry",
    "entries",
    "find_entry",
    "next_try",
    "spool_bytes",
]


@dataclass(frozen=True)
class QueueEntry:
    queue_id: str
    queue: Queue
    envelope: Envelope
    state: DeliveryState
    size: int

    def to_dict(self) -> dict[str, Any]:
        env, state = self.envelope, self.state
        return {
            "id": self.queue_id,
            "queue": self.queue.value,
            "account": env.account,
            "tenant": env.tenant,
            "client": env.client,
            "sender": env.sender,
            "recipients": list(state.pending(env)),
            "delivered": list(state.delivered),
            "bounced": list(state.bounced),
            "size": self.size,
            "received_at": env.received_at,
            "attempts": state.attempts,
            "next_attempt_at": state.next_attempt_at or None,
            "last_reply": state.last_reply,
            "relay": state.relay,
            "is_dsn": env.is_dsn,
        }


@dataclass(frozen=True)
class NextTry:
    """When a queued message is next tried (None: not on a timer) and what it waits for."""

    at: float | None
    waiting_for: str


def next_try(entry: QueueEntry, health: AccountHealth | None) -> NextTry:
    """The message's own retry time, or later when its account waits: an unhealthy account
    is not tried before its next probe and a paused one holds its mail (SPEC "Delivery").
    A lane's throttle pause lives in the daemon's memory only and is not shown here."""
    state = entry.state
    if entry.queue is Queue.COPY:
        return NextTry(None, "delivered; its Sent copy is being filed")
    if entry.queue is Queue.CORRUPT:
        return NextTry(None, "quarantined: never sent")
    if entry.queue is Queue.HOLD and (state.operator_hold or health is None or not health.paused):
        return NextTry(None, "held by the operator until `relayd queue release`")
    if health is not None and health.paused:
        reason = f" ({health.reason})" if health.reason else ""
        if health.operator_paused:
            return NextTry(None, f"account paused by the operator{reason}")
        return NextTry(
            health.retry_at or None,
            f"account paused{reason}: held until its credentials are fixed; the next probe "
            "logs in to see",
        )
    at = state.next_attempt_at or None
    unhealthy = health is not None and health.state is AccountState.UNHEALTHY
    if unhealthy and health is not None and health.retry_at > (at or 0.0):
        return NextTry(
            health.retry_at, f"account unhealthy ({health.reason}): waiting for its next probe"
        )
    if entry.queue is Queue.INCOMING or at is None:
        return NextTry(None, "now, as soon as a connection to its provider is free")
    return NextTry(at, "its next retry")


def _entry(spool: Spool, queue_id: str, queue: Queue) -> QueueEntry | None:
    try:
        msg = spool.load(queue_id, queue)
    except (SpoolError, OSError):
        return None
    return QueueEntry(queue_id, queue, msg.envelope, spool.read_state(queue_id), msg.content_length)


def entries(
    spool: Spool, queues: tuple[Queue, ...] = WAITING, account: str | None = None
) -> list[QueueEntry]:
    found: list[QueueEntry] = []
    for queue in queues:
        directory = spool.directory(queue)
        if not directory.is_dir():
            continue
        for name in sorted(os.listdir(directory)):
            entry = _entry(spool, name, queue)
            if entry is None:
                continue
            if account is not None and entry.envelope.account != account.lower():
                continue
            found.append(entry)
    return found


def find_entry(spool: Spool, queue_id: str) -> QueueEntry | None:
    queue = spool.locate(queue_id) if spool.directory(Queue.INCOMING).is_dir() else None
    return _entry(spool, queue_id, queue) if queue is not None else None


def spool_bytes(root: Path) -> int:
    """Bytes in the spool's files (not counting directory blocks)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


class QueueCensus:
    """Messages per (queue, account), for ``relayd status``, STATUS= and the metrics."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._account_of: dict[str, str] = {}

    def count(self) -> dict[tuple[Queue, str], int]:
        result: dict[tuple[Queue, str], int] = {}
        seen: set[str] = set()
        for queue in Queue:
            directory = self.spool.directory(queue)
            try:
                names = os.listdir(directory)
            except OSError:
                continue
            for name in names:
                seen.add(name)
                account = self._account_of.get(name)
                if account is None:
                    entry = _entry(self.spool, name, queue)
                    account = entry.envelope.account if entry is not None else "-"
                    if entry is not None:
                        self._account_of[name] = account
                result[(queue, account)] = result.get((queue, account), 0) + 1
        # Forget messages that left the spool, so the cache stays as small as the spool.
        for gone in set(self._account_of) - seen:
            del self._account_of[gone]
        return result
