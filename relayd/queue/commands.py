"""The operator's queue commands (``relayd queue flush|hold|release|delete``, ``release
--account``, and the web operator page's pause), written once.

They run in the daemon, over the control socket, so its scheduler never finds its files
moved behind its back; and on the spool directly while the daemon is stopped (every change is
a rename, safe with nobody else scheduling). The difference is only who listens: a
``QueueView`` is the running scheduler, or ``StoppedQueue`` when there is none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

from relayd.core.health import AccountHealth, AccountState
from relayd.core.queues import Queue
from relayd.errors import SpoolError
from relayd.spool.accounts import HealthBook
from relayd.spool.store import Spool

__all__ = [
    "CommandError",
    "QueueView",
    "StoppedQueue",
    "delete",
    "flush",
    "hold",
    "pause_account",
    "release",
    "release_account",
]


class CommandError(Exception):
    """The command cannot be carried out; the text says why, for the operator."""


class QueueView(Protocol):
    """What the commands need from whoever schedules the spool's messages."""

    @property
    def spool(self) -> Spool: ...

    def where(self, queue_id: str) -> Queue | None:
        """The queue the message is in, or None if there is no such message."""
        ...

    def withdraw(self, queue_id: str) -> bool:
        """Take the message out of line before a command moves it; False while it is being
        delivered (it cannot be moved then)."""
        ...

    def messages(self, queue: Queue, account: str | None) -> list[str]:
        """Queue ids in ``queue`` (of ``account`` only, unless None), oldest first."""
        ...

    def moved(self, queue_id: str, queue: Queue) -> None:
        """A command moved the message to ``queue``: ``incoming/`` means "schedule it"."""
        ...

    def removed(self, queue_id: str) -> None: ...


class StoppedQueue:
    """The spool with no daemon running: nobody to tell, nothing in flight."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def where(self, queue_id: str) -> Queue | None:
        return self.spool.locate(queue_id)

    def withdraw(self, queue_id: str) -> bool:
        return True

    def messages(self, queue: Queue, account: str | None) -> list[str]:
        try:
            names = sorted(os.listdir(self.spool.directory(queue)))
        except FileNotFoundError:
            return []
        if account is None:
            return names
        found = []
        for name in names:
            try:
                msg = self.spool.load_if_present(name, queue)
            except SpoolError:
                continue
            if msg is not None and msg.envelope.account == account.lower():
                found.append(name)
        return found

    def moved(self, queue_id: str, queue: Queue) -> None:
        return None

    def removed(self, queue_id: str) -> None:
        return None


def _present(view: QueueView, queue_id: str) -> Queue:
    queue = view.where(queue_id)
    if queue is None:
        raise CommandError(f"{queue_id}: no such message")
    return queue


def _withdraw(view: QueueView, queue_id: str) -> None:
    if not view.withdraw(queue_id):
        raise CommandError(f"{queue_id}: being delivered right now; try again")


def hold(view: QueueView, queue_id: str) -> None:
    """Keep a message from being attempted until ``release`` (``postsuper -h``)."""
    queue = _present(view, queue_id)
    if queue is Queue.HOLD:
        return
    if queue is Queue.CORRUPT:
        raise CommandError(f"{queue_id}: quarantined; it is never sent")
    _withdraw(view, queue_id)
    spool = view.spool
    # The mark first: a message found in hold/ without it would be released with its account.
    spool.write_state(queue_id, spool.read_state(queue_id).but(operator_hold=True))
    spool.move(queue_id, queue, Queue.HOLD)
    view.moved(queue_id, Queue.HOLD)


def release(view: QueueView, queue_id: str) -> None:
    """Put a held message back in line (``postsuper -H``); while its account is paused the
    scheduler holds it again at its attempt."""
    if view.where(queue_id) is not Queue.HOLD:
        raise CommandError(f"{queue_id}: not held")
    spool = view.spool
    state = spool.read_state(queue_id)
    if state.operator_hold:
        spool.write_state(queue_id, state.but(operator_hold=False))
    spool.move(queue_id, Queue.HOLD, Queue.INCOMING)
    view.moved(queue_id, Queue.INCOMING)


def delete(view: QueueView, queue_id: str) -> None:
    """Remove a message for good (``postsuper -d``)."""
    queue = _present(view, queue_id)
    _withdraw(view, queue_id)
    view.spool.remove(queue_id, queue)
    view.removed(queue_id)


def flush(
    view: QueueView,
    book: HealthBook,
    *,
    queue_id: str | None = None,
    account: str | None = None,
) -> int:
    """Retry deferred mail now (``postqueue -f``): one message, one account's, or all; the
    number moved. Upstreams marked unhealthy end their wait too (not paused accounts: those
    need fixed credentials, not another try)."""
    if queue_id is not None:
        if _present(view, queue_id) is not Queue.DEFERRED:
            return 0
        spool = view.spool
        found = [queue_id]
        msg = spool.load_if_present(queue_id, Queue.DEFERRED)
        if msg is not None:
            account = msg.envelope.account
    else:
        found = view.messages(Queue.DEFERRED, account)
    for health in book:
        if health.state is AccountState.UNHEALTHY and account in (None, health.address):
            book.set(health.with_retry_at(0.0))
    moved = 0
    for qid in found:
        if not view.withdraw(qid):
            continue
        try:
            view.spool.move(qid, Queue.DEFERRED, Queue.INCOMING)
        except FileNotFoundError:
            continue  # moved on meanwhile
        view.moved(qid, Queue.INCOMING)
        moved += 1
    return moved


@dataclass(frozen=True)
class Released:
    before: AccountHealth
    moved: int  # held messages put back in line


def release_account(view: QueueView, book: HealthBook, address: str) -> Released:
    """Resume a paused account (SPEC: ``relayd queue release --account A``) and put its held
    mail back in line, except what the operator holds message by message."""
    address = address.lower()
    before = book.get(address)
    book.set(before.on_released())
    moved = 0
    spool = view.spool
    for qid in view.messages(Queue.HOLD, address):
        if spool.read_state(qid).operator_hold:
            continue
        try:
            spool.move(qid, Queue.HOLD, Queue.INCOMING)
        except FileNotFoundError:
            continue
        view.moved(qid, Queue.INCOMING)
        moved += 1
    return Released(before, moved)


@dataclass(frozen=True)
class Paused:
    before: AccountHealth
    moved: int  # waiting messages put on hold


def pause_account(view: QueueView, book: HealthBook, address: str, now: float) -> Paused:
    """Hold an account's mail until ``release_account`` (the web operator page): it is still
    accepted (SPEC: mail for a paused account is accepted and held), nothing is attempted,
    and no probe or new credentials resume it. A message being delivered right now finishes
    its attempt."""
    address = address.lower()
    before = book.get(address)
    book.set(before.on_paused_by_operator(now))
    moved = 0
    for queue in (Queue.INCOMING, Queue.DEFERRED):
        for qid in view.messages(queue, address):
            if not view.withdraw(qid):
                continue
            try:
                view.spool.move(qid, queue, Queue.HOLD)
            except FileNotFoundError:
                continue
            view.moved(qid, Queue.HOLD)
            moved += 1
    return Paused(before, moved)
