"""Start-up with a big spool, and new mail announced by the accepting processes.

Recovery only lists names; the scheduler reads envelopes after READY (relayd.queue.intake).
A damaged file is still quarantined and never sent, whether the intake or the attempt finds
it; an announced message is queued without its file being read, and the attempt checks it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from factories import make_account, make_config, make_envelope, make_tenant, place

from relayd.config.model import AccountConfig, Config
from relayd.core.envelope import DeliveryState, Envelope
from relayd.core.outcome import Verdict
from relayd.core.states import RecipientResult
from relayd.queue.arrivals import Inlet
from relayd.queue.scheduler import Scheduler
from relayd.spool.accounts import AccountStore
from relayd.spool.store import Spool
from relayd.upstream.dataphase import ContentSource
from relayd.upstream.delivery import AccountSignal, AttemptReport
from relayd.upstream.transport import Transport

CONTENT = b"From: alice@acme.example\r\nSubject: queued\r\n\r\nHello\r\n"


class RecordingDeliverer:
    """Stands in for relayd.upstream.delivery.UpstreamDeliverer: every attempt succeeds."""

    def __init__(self) -> None:
        self.sent: list[tuple[tuple[str, ...], bytes]] = []

    def new_transport(self, account: AccountConfig) -> Transport:
        raise AssertionError("no probe in these tests")

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
        self.sent.append((pending, b"".join(content.iter_content())))
        results = [RecipientResult(r, Verdict.DELIVERED, "2.0.0", "250 2.0.0 ok") for r in pending]
        return AttemptReport(results, "sink:25", AccountSignal.LOGIN_OK), None


def config() -> Config:
    account = make_account("alice@acme.example")
    return make_config(tenants=[make_tenant("acme", accounts=[account])])


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "state", fsync=False)
    s.prepare()
    return s


def scheduler_for(spool: Spool, deliverer: RecordingDeliverer) -> Scheduler:
    accounts = AccountStore(spool.root.parent, fsync=False)
    accounts.prepare()
    return Scheduler(
        config=config(), spool=spool, accounts=accounts, deliverer=deliverer, inlet=Inlet()
    )


async def spool_message(spool: Spool, envelope: Envelope, queue: str = "incoming") -> str:
    reception = spool.receive(envelope)
    reception.write(CONTENT + envelope.queue_id.encode())
    qid = await reception.commit()
    if queue != "incoming":
        place(spool, qid, queue)
    return qid


def damage(spool: Spool, queue_id: str, queue: str) -> None:
    path = spool.root / queue / queue_id
    path.write_bytes(path.read_bytes()[:-7])  # cut short, as by a crash


async def settle(scheduler: Scheduler, spool: Spool, done: Any) -> None:
    for _ in range(500):
        await asyncio.sleep(0.01)
        if done():
            break
    await scheduler.stop()


def names(spool: Spool, queue: str) -> list[str]:
    return sorted(os.listdir(spool.root / queue))


async def test_fast_start_reads_no_file_and_still_quarantines_the_damaged_ones(
    spool: Spool,
) -> None:
    good = [await spool_message(spool, make_envelope()) for _ in range(20)]
    bad_incoming = await spool_message(spool, make_envelope())
    damage(spool, bad_incoming, "incoming")
    bad_deferred = await spool_message(spool, make_envelope(), "deferred")
    damage(spool, bad_deferred, "deferred")
    later = await spool_message(spool, make_envelope(), "deferred")
    spool.write_state(later, DeliveryState(attempts=1, next_attempt_at=4e9))
    stray = spool.root / "incoming" / "not-a-queue-id"
    stray.write_bytes(b"garbage")

    report = spool.recover(check_files=False)
    assert (report.queued, report.quarantined) == (24, 0)  # names only

    deliverer = RecordingDeliverer()
    scheduler = scheduler_for(spool, deliverer)
    scheduler.start()
    assert scheduler.knows(bad_incoming) and scheduler.knows(later)  # known before READY
    await settle(scheduler, spool, lambda: len(deliverer.sent) == len(good))

    sent = sorted(content for _, content in deliverer.sent)
    assert sent == sorted(CONTENT + qid.encode() for qid in good)
    assert names(spool, "corrupt") == sorted([bad_incoming, bad_deferred, "not-a-queue-id"])
    assert names(spool, "deferred") == [later]  # waits for its time, untouched
    assert names(spool, "incoming") == names(spool, "active") == []


async def test_a_file_damaged_after_intake_is_quarantined_at_the_attempt(spool: Spool) -> None:
    deliverer = RecordingDeliverer()
    scheduler = scheduler_for(spool, deliverer)
    scheduler.start()
    qid = await spool_message(spool, make_envelope())
    damage(spool, qid, "incoming")
    # Announced with its account by an accepting process: queued without reading the file.
    scheduler.new_mail(qid, "alice@acme.example")
    await settle(scheduler, spool, lambda: names(spool, "corrupt") == [qid])
    assert deliverer.sent == []
    assert names(spool, "corrupt") == [qid]


async def test_an_announced_message_is_queued_without_reading_its_file(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    deliverer = RecordingDeliverer()
    scheduler = scheduler_for(spool, deliverer)
    scheduler.start()
    qid = await spool_message(spool, make_envelope())

    def no_reading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the announcement names the account")

    monkeypatch.setattr(spool, "load_if_present", no_reading)
    scheduler.new_mail(qid, "alice@acme.example")
    scheduler.new_mail(qid)  # announced and found by a scan as well: queued once
    scheduler.requeued(qid)
    await settle(scheduler, spool, lambda: bool(deliverer.sent) and not names(spool, "incoming"))
    assert [content for _, content in deliverer.sent] == [CONTENT + qid.encode()]
    assert names(spool, "incoming") == names(spool, "active") == []
