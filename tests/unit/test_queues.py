"""The spool's queues as data: one table of moves, checked by every rename (relayd.core.queues)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
from factories import make_account, make_envelope

from relayd.config.model import Limits
from relayd.core.queues import MOVES, IllegalMove, Queue, check_move
from relayd.queue.lanes import Lane
from relayd.queue.timers import RetryTimers
from relayd.spool.store import Spool

ALLOWED = {(source, target) for source, targets in MOVES.items() for target in targets}


def test_every_queue_has_a_row_and_nothing_leaves_corrupt() -> None:
    assert set(MOVES) == set(Queue)
    assert MOVES[Queue.CORRUPT] == frozenset()
    assert all(Queue.CORRUPT in MOVES[q] for q in Queue if q is not Queue.CORRUPT)


def test_delivered_mail_never_goes_back_upstream_except_a_dsn_by_way_of_incoming() -> None:
    # copy/ holds delivered mail and DSNs; only incoming/ (a DSN sent over SMTP after all),
    # hold/ (the operator) and corrupt/ are ways out, never active/ or deferred/ directly.
    assert MOVES[Queue.COPY] == {Queue.INCOMING, Queue.HOLD, Queue.CORRUPT}
    # An attempt starts only from incoming/.
    assert {s for s, t in ALLOWED if t is Queue.ACTIVE} == {Queue.INCOMING}


@pytest.mark.parametrize(("source", "target"), list(itertools.product(Queue, Queue)))
def test_check_move_follows_the_table(source: Queue, target: Queue) -> None:
    if (source, target) in ALLOWED:
        check_move(source, target)
    else:
        with pytest.raises(IllegalMove, match=f"{source.value}/ to {target.value}/"):
            check_move(source, target)


async def test_the_spool_refuses_an_illegal_move_and_leaves_the_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path, fsync=False)
    spool.prepare()
    reception = spool.receive(make_envelope())
    reception.write(b"Subject: x\r\n\r\nbody\r\n")
    qid = await reception.commit()
    spool.move(qid, Queue.INCOMING, Queue.ACTIVE)
    spool.move(qid, Queue.ACTIVE, Queue.CORRUPT)
    with pytest.raises(IllegalMove):
        spool.move(qid, Queue.CORRUPT, Queue.INCOMING)
    assert spool.locate(qid) is Queue.CORRUPT


def test_retry_timers_give_due_messages_oldest_first_and_can_make_all_due() -> None:
    timers = RetryTimers()
    timers.add("B", 20.0)
    timers.add("A", 10.0)
    timers.add("C", 30.0)
    assert list(timers.due(5.0)) == []
    assert list(timers.due(20.0)) == ["A", "B"]
    assert timers.next_due() == 30.0
    timers.add("D", 40.0)
    assert timers.make_due({"D"}) == 1
    assert list(timers.due(0.0)) == ["D"]
    assert timers.make_due() == 1
    assert list(timers.due(0.0)) == ["C"] and len(timers) == 0


def test_a_lane_paces_its_starts_per_minute() -> None:
    account = make_account("alice@acme.example")
    paced = dataclasses.replace(account, limits=Limits(max_messages_per_minute=2))
    lane = Lane(account.address, paced)
    assert lane.wait_for_pace(100.0) == 0.0
    assert lane.wait_for_pace(110.0) == 0.0
    assert lane.wait_for_pace(120.0) == pytest.approx(40.0)  # the first start leaves at 160
    assert lane.wait_for_pace(160.0) == 0.0
    unlimited = Lane(account.address, account)
    assert all(unlimited.wait_for_pace(200.0) == 0.0 for _ in range(100))
