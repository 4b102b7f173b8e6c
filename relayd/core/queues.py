"""The spool's queues and the one table of moves between them: pure data, no I/O.

A message's state is the queue (the spool directory) it lives in, as in Postfix: every state
change is a rename from one queue to another, and ``relayd.spool.store.Spool.move`` refuses
any rename this table does not list. So "a delivered message never goes upstream again" or
"nothing leaves corrupt/" is a property of one table, not of every caller's care.

``tmp/`` (receptions in progress), ``state/`` and ``free/`` are the spool's own
bookkeeping, not queues: nothing in them is ever scheduled.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

__all__ = [
    "AT_START",
    "MOVES",
    "WAITING",
    "IllegalMove",
    "Queue",
    "check_move",
]


class Queue(enum.Enum):
    INCOMING = "incoming"  # accepted and durable, waiting for the scheduler
    ACTIVE = "active"  # being delivered
    DEFERRED = "deferred"  # waiting for its next attempt
    HOLD = "hold"  # kept and not attempted: paused account, or held by the operator
    COPY = "copy"  # delivered (or a DSN): waiting only to be filed over IMAP
    CORRUPT = "corrupt"  # quarantined: unreadable or cut short, never sent

    def __str__(self) -> str:
        return self.value


class IllegalMove(ValueError):
    """A move the table does not allow: a bug in the caller, never a fault of the disk."""

    def __init__(self, source: Queue, target: Queue) -> None:
        super().__init__(f"no move from {source.value}/ to {target.value}/")
        self.source = source
        self.target = target


# Every move, and why it exists. Anything may be quarantined except what already is.
MOVES: Mapping[Queue, frozenset[Queue]] = MappingProxyType(
    {
        Queue.INCOMING: frozenset(
            {
                Queue.ACTIVE,  # an attempt starts
                Queue.HOLD,  # its account is paused, or the operator holds it
                Queue.CORRUPT,
            }
        ),
        Queue.ACTIVE: frozenset(
            {
                Queue.INCOMING,  # the attempt was cut off by a stop or crash: at-least-once
                Queue.DEFERRED,  # a temporary failure
                Queue.HOLD,  # credentials refused: the account is paused
                Queue.COPY,  # delivered; its Sent copy is the filing stage's step
                Queue.CORRUPT,
            }
        ),
        Queue.DEFERRED: frozenset(
            {
                Queue.INCOMING,  # its retry time came, or the operator flushed it
                Queue.HOLD,
                Queue.CORRUPT,
            }
        ),
        Queue.HOLD: frozenset(
            {
                Queue.INCOMING,  # released: the account resumed, or the operator said so
                Queue.CORRUPT,
            }
        ),
        Queue.COPY: frozenset(
            {
                # A DSN that cannot be filed over IMAP goes out over SMTP instead (SPEC
                # "DSNs"). A delivered message never does: the attempt that finds its filing
                # job sends it straight back to copy/.
                Queue.INCOMING,
                Queue.HOLD,  # the operator holds a message whose Sent copy waits
                Queue.CORRUPT,
            }
        ),
        Queue.CORRUPT: frozenset(),  # kept for a human to look at, never sent
    }
)

#: Where the scheduler finds its messages at start (copy/ belongs to the filing stage).
AT_START = (Queue.INCOMING, Queue.DEFERRED, Queue.HOLD)
#: Where a message waits for delivery (shown by ``relayd status`` as "queued").
WAITING = (Queue.INCOMING, Queue.ACTIVE, Queue.DEFERRED, Queue.HOLD)


def check_move(source: Queue, target: Queue) -> None:
    """Raise ``IllegalMove`` unless the table lists the move."""
    if target not in MOVES[source]:
        raise IllegalMove(source, target)
