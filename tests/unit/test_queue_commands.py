"""The operator's queue commands, written once (relayd.queue.commands): the same calls work on
the spool with the daemon stopped and through the running scheduler."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from factories import make_account, make_config, make_envelope, make_tenant, place

from relayd.config.model import AccountConfig, Config
from relayd.core.envelope import DeliveryState
from relayd.core.health import AccountHealth, AccountState, credentials_fingerprint
from relayd.core.queues import Queue
from relayd.queue import commands
from relayd.queue.arrivals import Inlet
from relayd.queue.commands import CommandError, QueueView, StoppedQueue
from relayd.queue.scheduler import Scheduler
from relayd.spool.accounts import AccountStore, HealthBook
from relayd.spool.store import Spool
from relayd.upstream.dataphase import ContentSource
from relayd.upstream.delivery import AttemptReport
from relayd.upstream.transport import Transport

ALICE = "alice@acme.example"
BOB = "bob@acme.example"


def config() -> Config:
    accounts = [make_account(ALICE), make_account(BOB)]
    return make_config(tenants=[make_tenant("acme", accounts=accounts)])


class NeverDelivers:
    """The scheduler must not attempt anything while these tests look at the queues."""

    def __init__(self) -> None:
        self.attempts = 0

    def new_transport(self, account: AccountConfig) -> Transport:
        raise AssertionError("no probe expected")

    async def attempt(
        self,
        account: AccountConfig,
        sender: str,
        pending: tuple[str, ...],
        content: ContentSource,
        transport: Transport | None,
        *,
        smtputf8: bool = False,
    ) -> tuple[AttemptReport, Transport | None]:
        self.attempts += 1
        await asyncio.Event().wait()  # stays "being delivered" until the test ends
        raise AssertionError("unreachable")


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "state", fsync=False)
    s.prepare()
    return s


async def spooled(spool: Spool, queue: Queue, sender: str = ALICE) -> str:
    envelope = make_envelope(sender=sender, account=sender)
    reception = spool.receive(envelope)
    reception.write(b"Subject: x\r\n\r\nbody\r\n")
    qid = await reception.commit()
    place(spool, qid, queue)
    if queue is Queue.DEFERRED:
        spool.write_state(qid, DeliveryState(attempts=1, next_attempt_at=4e9))  # not yet due
    return qid


async def test_hold_and_release_a_deferred_message(spool: Spool) -> None:
    qid = await spooled(spool, Queue.DEFERRED)
    view = StoppedQueue(spool)
    commands.hold(view, qid)
    assert spool.locate(qid) is Queue.HOLD and spool.read_state(qid).operator_hold
    commands.hold(view, qid)  # already held: nothing to do
    commands.release(view, qid)
    assert spool.locate(qid) is Queue.INCOMING and not spool.read_state(qid).operator_hold
    with pytest.raises(CommandError, match="not held"):
        commands.release(view, qid)


async def test_commands_on_a_stopped_and_on_a_running_queue(spool: Spool, tmp_path: Path) -> None:
    # The same sequence of calls against both views: files end up in the same queues.
    for name in ("stopped", "running"):
        root = tmp_path / name
        one = Spool(root, fsync=False)
        one.prepare()
        deferred = [await spooled(one, Queue.DEFERRED) for _ in range(2)]
        held_for_pause = await spooled(one, Queue.HOLD)
        held_by_operator = await spooled(one, Queue.HOLD)
        one.write_state(held_by_operator, DeliveryState(operator_hold=True))
        bobs = await spooled(one, Queue.DEFERRED, sender=BOB)
        corrupt = await spooled(one, Queue.CORRUPT)
        store = AccountStore(root, fsync=False)
        store.prepare()
        # As the scheduler would have left them, credentials unchanged since.
        accounts = {a.address: a for a in config().accounts()}
        paused = AccountHealth(ALICE, state=AccountState.PAUSED, reason="535", retry_at=4e9)
        unhealthy = AccountHealth(BOB, state=AccountState.UNHEALTHY, retry_at=4e9)
        for health in (paused, unhealthy):
            fingerprint = credentials_fingerprint(accounts[health.address])
            store.save(dataclasses.replace(health, credentials_fingerprint=fingerprint))
        scheduler: Scheduler | None = None
        view: QueueView
        if name == "stopped":
            book = HealthBook(store)
            book.load()
            view = StoppedQueue(one)
        else:
            deliverer = NeverDelivers()
            scheduler = Scheduler(
                config=config(), spool=one, accounts=store, deliverer=deliverer, inlet=Inlet()
            )
            scheduler.start()
            await asyncio.sleep(0.05)
            view, book = scheduler, scheduler.book
        try:
            with pytest.raises(CommandError, match="no such message"):
                commands.hold(view, "0000NOSUCHMESSAGE000")
            with pytest.raises(CommandError, match="quarantined"):
                commands.hold(view, corrupt)
            commands.hold(view, deferred[0])
            assert one.locate(deferred[0]) is Queue.HOLD
            # Bob's upstream was marked unhealthy: a flush ends that wait too.
            assert commands.flush(view, book, account=BOB) == 1
            assert book.get(BOB).retry_at == 0.0
            assert one.locate(bobs) is not Queue.DEFERRED
            released = commands.release_account(view, book, ALICE)
            assert released.before.paused and not book.get(ALICE).paused
            assert released.moved == 1  # not the one the operator holds, nor deferred[0]
            assert one.locate(held_by_operator) is Queue.HOLD
            assert one.locate(deferred[0]) is Queue.HOLD
            commands.delete(view, deferred[1])
            assert one.locate(deferred[1]) is None
            if scheduler is not None:
                # Bob's and the released one went straight to their attempts (which never end):
                # being delivered, they cannot be held or deleted now.
                await asyncio.sleep(0.05)
                with pytest.raises(CommandError, match="being delivered"):
                    commands.delete(view, bobs)
                assert one.locate(bobs) is Queue.ACTIVE
            else:
                assert one.locate(bobs) is Queue.INCOMING
                assert one.locate(held_for_pause) is Queue.INCOMING
        finally:
            if scheduler is not None:
                await scheduler.stop(timeout=0.1)


async def test_pause_by_the_operator_holds_until_released(spool: Spool, tmp_path: Path) -> None:
    """The web operator page's pause: on a stopped and on a running queue alike, waiting
    mail goes on hold, nothing is attempted, new credentials do not resume it."""
    for name in ("stopped", "running"):
        root = tmp_path / name
        one = Spool(root, fsync=False)
        one.prepare()
        waiting = [await spooled(one, Queue.DEFERRED), await spooled(one, Queue.INCOMING)]
        bobs = await spooled(one, Queue.DEFERRED, sender=BOB)
        store = AccountStore(root, fsync=False)
        store.prepare()
        scheduler: Scheduler | None = None
        view: QueueView
        deliverer = NeverDelivers()
        if name == "stopped":
            book = HealthBook(store)
            book.load()
            view = StoppedQueue(one)
        else:
            scheduler = Scheduler(
                config=config(), spool=one, accounts=store, deliverer=deliverer, inlet=Inlet()
            )
            # Paused before the scheduler takes its spool in: nothing of Alice's is attempted.
            book = HealthBook(store)
            commands.pause_account(StoppedQueue(one), book, ALICE, now=1000.0)
            scheduler.start()
            await asyncio.sleep(0.05)
            view, book = scheduler, scheduler.book
        try:
            paused = commands.pause_account(view, book, ALICE, now=1000.0)
            health = book.get(ALICE)
            assert health.paused and health.operator_paused
            assert health.reason == "paused by the operator"
            assert [one.locate(q) for q in waiting] == [Queue.HOLD, Queue.HOLD]
            assert one.locate(bobs) is not Queue.HOLD
            assert paused.moved == (2 if name == "stopped" else 0)
            # A changed password is no reason to resume what the operator paused.
            assert health.on_credentials_changed("new").paused
            if scheduler is not None:
                scheduler.credentials_changed()
                assert scheduler.health(ALICE).paused
                assert deliverer.attempts == 0
            released = commands.release_account(view, book, ALICE)
            assert released.before.operator_paused and not book.get(ALICE).paused
            assert not book.get(ALICE).operator_paused
            assert released.moved == 2
        finally:
            if scheduler is not None:
                await scheduler.stop(timeout=0.1)
