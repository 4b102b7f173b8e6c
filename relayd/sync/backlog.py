"""The filing queue in the spool: ``copy/`` holds messages waiting to be filed over IMAP.

A message enters ``copy/`` when its delivery is finished and it wants a Sent copy, or when
relayd wrote a DSN for the sender's INBOX. Its ``FilingJob`` (attempts, next attempt, whether
an APPEND was already sent) lives in the delivery state beside it, written *before* the file
moves, so a message in ``copy/`` always has one, and a delivered message caught in
``active/`` by a crash is recognised by spool recovery and never sent upstream again.

Every state change is an atomic write or a rename, like the rest of the spool.
"""

from __future__ import annotations

import contextlib

from relayd.core.envelope import DeliveryState, Envelope
from relayd.core.queues import Queue
from relayd.core.sentcopy import FilingJob, Folder, with_job
from relayd.spool.store import Spool

__all__ = ["add_dsn", "enter_from_active", "return_to_delivery"]


def enter_from_active(spool: Spool, queue_id: str, state: DeliveryState) -> DeliveryState:
    """A delivered message waits for its Sent copy (state first, then the rename); the
    state it has now."""
    waiting = with_job(state, FilingJob(Folder.SENT))
    spool.write_state(queue_id, waiting)
    spool.move(queue_id, Queue.ACTIVE, Queue.COPY)
    return waiting


def add_dsn(spool: Spool, envelope: Envelope, content: bytes, now: float) -> None:
    """Spool a DSN straight into ``copy/`` for the INBOX, durable before this returns.

    Its envelope is the one SMTP would use (from the account to the sender), so the DSN can
    still go that way if IMAP filing is impossible.
    """
    queue_id = envelope.queue_id
    spool.write_state(queue_id, with_job(DeliveryState(delivered_at=now), FilingJob(Folder.INBOX)))
    reception = spool.receive(envelope)
    try:
        reception.write(content)
        reception.commit_into(spool.directory(Queue.COPY), fsync=spool.fsync)
    except BaseException:
        reception.abort()
        spool.remove(queue_id, Queue.COPY)
        raise


def return_to_delivery(spool: Spool, queue_id: str) -> None:
    """A DSN that cannot be filed over IMAP goes out over SMTP instead (SPEC "DSNs": sent
    through the same account to itself). The filing job goes first: a crash in between leaves
    a DSN in ``copy/`` without a job, which the filing stage sends on the same way."""
    spool.write_state(queue_id, DeliveryState())
    with contextlib.suppress(FileNotFoundError):
        spool.move(queue_id, Queue.COPY, Queue.INCOMING)
