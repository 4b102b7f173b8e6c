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
import os

from relayd.core.envelope import DeliveryState, Envelope
from relayd.core.sentcopy import FilingJob, Folder, with_job
from relayd.spool.store import Spool

__all__ = ["FILING_QUEUE", "add_dsn", "enter_from_active", "return_to_delivery"]

FILING_QUEUE = "copy"


def enter_from_active(spool: Spool, queue_id: str, state: DeliveryState) -> None:
    """A delivered message waits for its Sent copy (state first, then the rename)."""
    spool.write_state(queue_id, with_job(state, FilingJob(Folder.SENT)))
    spool.move(queue_id, "active", FILING_QUEUE)


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
        reception.finish_file()  # trailer + fsync of the file
        os.rename(reception.tmp_path, spool.root / FILING_QUEUE / queue_id)
    except BaseException:
        reception.abort()
        spool.remove(queue_id, FILING_QUEUE)
        raise
    if spool.fsync:
        fd = os.open(spool.root / FILING_QUEUE, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def return_to_delivery(spool: Spool, queue_id: str) -> None:
    """A DSN that cannot be filed over IMAP goes out over SMTP instead (SPEC "DSNs": sent
    through the same account to itself). The filing job goes first: a crash in between leaves
    a DSN in ``copy/`` without a job, which the filing stage sends on the same way."""
    spool.write_state(queue_id, DeliveryState())
    with contextlib.suppress(FileNotFoundError):
        spool.move(queue_id, FILING_QUEUE, "incoming")
