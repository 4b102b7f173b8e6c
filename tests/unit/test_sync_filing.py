"""The filing stage on the local side: copy/ in the spool, recovery, and the capture Maildir.

Everything here runs without a network: the capture provider stands in for the mailbox. The
IMAP side is in tests/integration/test_sent_copy.py, against real Dovecot.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from factories import DEFAULT_RETRY, make_account, make_config, make_envelope, make_tenant, place

from relayd.config.model import AccountConfig, Config, ImapServer, SentCopy, TlsMode
from relayd.core.envelope import DeliveryState, Envelope
from relayd.core.queues import Queue
from relayd.core.sentcopy import FilingJob, Folder, job_of, with_job
from relayd.queue.arrivals import Inlet
from relayd.queue.scheduler import Scheduler
from relayd.spool.accounts import AccountStore
from relayd.spool.store import Spool
from relayd.sync.backlog import add_dsn
from relayd.sync.connections import ImapConnections
from relayd.sync.filing import FilingStage
from relayd.upstream.credentials import Credential
from relayd.upstream.delivery import UpstreamDeliverer

CONTENT = b"From: alice@acme.example\r\nMessage-ID: <m1@acme.example>\r\n\r\nHello\r\n"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "state", fsync=False)
    s.prepare()
    return s


def capture_setup(tmp_path: Path, sent_copy: SentCopy = SentCopy.AUTO) -> tuple[Config, Path]:
    maildir = tmp_path / "capture"
    account = dataclasses.replace(
        make_account("alice@acme.example", provider="capture", capture_path=maildir),
        sent_copy=sent_copy,
    )
    config = make_config(tenants=[make_tenant("acme", provider="capture", accounts=[account])])
    return config, maildir


async def spool_message(spool: Spool, envelope: Envelope, queue: str) -> str:
    reception = spool.receive(envelope)
    reception.write(CONTENT)
    qid = await reception.commit()
    if queue != "incoming":
        place(spool, qid, queue)
    return qid


def stage_for(
    config: Config, spool: Spool, requeue: Callable[[str], None] | None = None
) -> FilingStage:
    return FilingStage(
        config=config,
        spool=spool,
        connections=ImapConnections(),
        requeue=requeue or (lambda qid: None),
        fsync=False,
    )


def sent_files(maildir: Path) -> list[Path]:
    cur = maildir / ".Sent" / "cur"
    return sorted(cur.iterdir()) if cur.exists() else []


async def settle(stage: FilingStage) -> None:
    for _ in range(200):
        await asyncio.sleep(0.01)
        if not stage._tasks and not any(lane.ready for lane in stage._lanes.values()):
            return


def delivered_state(at: float = 1_700_000_100.0) -> DeliveryState:
    return DeliveryState(attempts=1, delivered=("bob@example.net",), delivered_at=at)


# -- spool recovery ------------------------------------------------------------------------------


async def test_recovery_never_requeues_a_delivered_message(spool: Spool) -> None:
    filed = await spool_message(spool, make_envelope(), "active")
    spool.write_state(filed, with_job(delivered_state(), FilingJob(Folder.SENT)))
    interrupted = await spool_message(spool, make_envelope(), "active")
    waiting = await spool_message(spool, make_envelope(), "incoming")
    place(spool, waiting, Queue.COPY)
    spool.write_state(waiting, with_job(delivered_state(), FilingJob(Folder.SENT)))
    report = spool.recover()
    assert spool.list(Queue.COPY) == sorted([filed, waiting])
    assert spool.list(Queue.INCOMING) == [interrupted]
    assert report.requeued_active == 1
    assert job_of(spool.read_state(filed)) == FilingJob(Folder.SENT)  # state kept


async def test_recovery_quarantines_a_truncated_file_in_copy(spool: Spool) -> None:
    qid = await spool_message(spool, make_envelope(), "incoming")
    place(spool, qid, Queue.COPY)
    path = spool.directory(Queue.COPY) / qid
    path.write_bytes(path.read_bytes()[:-10])
    spool.recover()
    assert spool.list(Queue.CORRUPT) == [qid]


def test_a_dsn_for_the_inbox_is_durable_in_copy(spool: Spool) -> None:
    envelope = make_envelope(is_dsn=True)
    add_dsn(spool, envelope, CONTENT, now=1234.0)
    assert spool.list(Queue.COPY) == [envelope.queue_id]
    assert os.listdir(spool.root / "tmp") == []
    assert spool.load(envelope.queue_id, Queue.COPY).read_content() == CONTENT
    state = spool.read_state(envelope.queue_id)
    assert state.delivered_at == 1234.0
    assert job_of(state) == FilingJob(Folder.INBOX)


# -- the stage with the capture Maildir ----------------------------------------------------------


async def test_capture_copy_is_filed_once_even_when_filed_again(
    spool: Spool, tmp_path: Path
) -> None:
    config, maildir = capture_setup(tmp_path)
    stage = stage_for(config, spool)
    stage.start()
    qid = await spool_message(spool, make_envelope(), "active")
    account = config.accounts()[0]
    assert stage.take_delivered(spool.load(qid, Queue.ACTIVE), account, delivered_state())
    await settle(stage)
    [copy] = sent_files(maildir)
    assert copy.read_bytes() == CONTENT and copy.name.endswith(":2,S")  # flagged Seen
    assert spool.list(Queue.COPY) == []
    # A crash after filing but before bookkeeping: the same message is filed again.
    again = await spool_message(spool, make_envelope(queue_id=qid), "active")
    assert stage.take_delivered(spool.load(again, Queue.ACTIVE), account, delivered_state())
    await settle(stage)
    assert sent_files(maildir) == [copy]
    await stage.stop()


@pytest.mark.parametrize(
    ("sent_copy", "is_dsn", "delivered", "wanted"),
    [
        (SentCopy.AUTO, False, True, True),
        (SentCopy.NEVER, False, True, False),
        (SentCopy.AUTO, True, True, False),  # a DSN never lands in Sent
        (SentCopy.AUTO, False, False, False),  # every recipient bounced: nothing was sent
    ],
)
async def test_what_gets_a_copy(
    spool: Spool, tmp_path: Path, sent_copy: SentCopy, is_dsn: bool, delivered: bool, wanted: bool
) -> None:
    config, _ = capture_setup(tmp_path, sent_copy)
    stage = stage_for(config, spool)
    qid = await spool_message(spool, make_envelope(is_dsn=is_dsn), "active")
    state = delivered_state() if delivered else DeliveryState(bounced=("bob@example.net",))
    taken = stage.take_delivered(spool.load(qid, Queue.ACTIVE), config.accounts()[0], state)
    assert taken is wanted
    assert spool.list(Queue.COPY) == ([qid] if wanted else [])
    assert spool.list(Queue.ACTIVE) == ([] if wanted else [qid])


async def test_dsn_goes_over_imap_only_when_the_account_has_imap(
    spool: Spool, tmp_path: Path
) -> None:
    config, _ = capture_setup(tmp_path)
    stage = stage_for(config, spool)
    no_imap = make_account("alice@acme.example")
    assert not await stage.take_dsn(make_envelope(is_dsn=True), CONTENT, no_imap)
    assert spool.list(Queue.COPY) == []
    assert not await stage.take_dsn(make_envelope(is_dsn=True), CONTENT, config.accounts()[0])


async def test_start_picks_up_copy_and_files_it(spool: Spool, tmp_path: Path) -> None:
    config, maildir = capture_setup(tmp_path)
    qid = await spool_message(spool, make_envelope(), "incoming")
    place(spool, qid, Queue.COPY)
    spool.write_state(qid, with_job(delivered_state(), FilingJob(Folder.SENT)))
    stage = stage_for(config, spool)
    stage.start()
    await settle(stage)
    await asyncio.sleep(0.1)
    await settle(stage)
    assert len(sent_files(maildir)) == 1
    assert spool.list(Queue.COPY) == []
    await stage.stop()


async def test_settings_that_no_longer_want_a_copy_drop_it(spool: Spool, tmp_path: Path) -> None:
    config, maildir = capture_setup(tmp_path, SentCopy.NEVER)
    qid = await spool_message(spool, make_envelope(), "incoming")
    place(spool, qid, Queue.COPY)
    spool.write_state(qid, with_job(delivered_state(), FilingJob(Folder.SENT)))
    stage = stage_for(config, spool)
    stage.resume(qid)
    await settle(stage)
    assert sent_files(maildir) == []
    assert spool.list(Queue.COPY) == [] and spool.list(Queue.INCOMING) == []


def unreachable_imap(spool: Spool) -> tuple[FilingStage, AccountConfig]:
    # Nothing listens on port 9 of loopback: the connection is refused at once.
    imap = ImapServer("127.0.0.1", 9, TlsMode.NONE, None, None, None, None)
    account: AccountConfig = dataclasses.replace(make_account("alice@acme.example"), imap=imap)
    config = make_config(tenants=[make_tenant("acme", accounts=[account])])
    stage = stage_for(config, spool)
    return stage, account


async def test_an_unreachable_imap_defers_the_copy_without_touching_delivery(
    spool: Spool,
) -> None:
    stage, account = unreachable_imap(spool)
    qid = await spool_message(spool, make_envelope(), "active")
    assert stage.take_delivered(
        spool.load(qid, Queue.ACTIVE), account, delivered_state(time.time())
    )
    await settle(stage)
    assert spool.list(Queue.COPY) == [qid]
    assert spool.list(Queue.INCOMING) == [] and spool.list(Queue.DEFERRED) == []
    job = job_of(spool.read_state(qid))
    assert job is not None and job.attempts == 1 and "imap 127.0.0.1:9" in job.last_error
    assert not job.append_issued  # never got as far as an APPEND
    assert job.next_attempt_at > time.time()
    await stage.stop()


async def test_a_copy_past_its_lifetime_is_dropped_with_one_alert(
    spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    stage, account = unreachable_imap(spool)
    qid = await spool_message(spool, make_envelope(), "active")
    long_ago = time.time() - DEFAULT_RETRY.give_up_after - 1
    assert stage.take_delivered(spool.load(qid, Queue.ACTIVE), account, delivered_state(long_ago))
    await settle(stage)
    assert all(
        not spool.list(q) for q in (Queue.INCOMING, Queue.ACTIVE, Queue.DEFERRED, Queue.COPY)
    )
    alerts = [r for r in caplog.records if "ALERT" in r.getMessage()]
    assert len(alerts) == 1 and "Sent copy dropped" in alerts[0].getMessage()
    await stage.stop()


# -- the scheduler's side ------------------------------------------------------------------------


async def test_scheduler_hands_a_delivered_message_to_filing_and_never_resends(
    spool: Spool, tmp_path: Path
) -> None:
    config, maildir = capture_setup(tmp_path)
    inlet = Inlet()
    stage = stage_for(config, spool, inlet.requeued)
    accounts = AccountStore(tmp_path / "state", fsync=False)
    accounts.prepare()

    class NoCredentials:
        async def obtain(self, account: AccountConfig) -> Credential:
            raise AssertionError("capture needs no login")

        def rejected(self, account: AccountConfig, credential: Credential) -> None:
            raise AssertionError("capture needs no login")

    deliverer = UpstreamDeliverer(helo_name="relayd.test", credentials=NoCredentials(), fsync=False)
    scheduler = Scheduler(
        config=config,
        spool=spool,
        accounts=accounts,
        deliverer=deliverer,
        inlet=inlet,
        filing=stage,
    )
    scheduler.start()
    stage.start()
    fresh = await spool_message(spool, make_envelope(), "incoming")
    inlet.new_mail(fresh)
    # One that was delivered before (an operator's hold and release put it back in line).
    done = await spool_message(spool, make_envelope(), "incoming")
    spool.write_state(done, with_job(delivered_state(), FilingJob(Folder.SENT)))
    inlet.requeued(done)
    for _ in range(300):
        await asyncio.sleep(0.01)
        if len(sent_files(maildir)) == 2 and not spool.list(Queue.COPY):
            break
    delivered = sorted((maildir / "new").iterdir())
    assert len(delivered) == 1  # only the fresh one went "upstream"
    assert len(sent_files(maildir)) == 2
    assert all(
        not spool.list(q) for q in (Queue.INCOMING, Queue.ACTIVE, Queue.DEFERRED, Queue.COPY)
    )
    await scheduler.stop()
    await stage.stop()
