"""Receiving in an accepting process: commits on the event loop, reserved files, one write.

The promise is the same as in the main process (tests/unit/test_spool_store.py): no 250
before the file and its name in incoming/ are durable; only where and how the work is done
changes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
from pathlib import Path

import pytest
from factories import make_envelope

import relayd.spool.reception as reception_module
import relayd.spool.reserved as reserved_module
import relayd.spool.store as store_module
from relayd.core.envelope import DeliveryState, Envelope
from relayd.core.queues import Queue
from relayd.spool.message import InProgress
from relayd.spool.reception import Reception
from relayd.spool.store import Spool, new_queue_id

MESSAGE = b"From: alice@acme.example\r\nSubject: hi\r\n\r\nHello\r\n"


def names(spool: Spool, queue: str) -> list[str]:
    return sorted(os.listdir(spool.root / queue))


def pool_of(spool: Spool, size: int, share: tuple[int, int]) -> reserved_module.ReservedFiles:
    return reserved_module.ReservedFiles(
        spool.root / "incoming", spool.root / "free", new_queue_id, size=size, share=share
    )


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path, commit_in_loop=True, reserved_files=2)
    s.prepare()
    return s


async def test_in_loop_commits_are_batched_durable_and_in_order(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, ...]] = []
    real_fsync, real_rename = os.fsync, os.rename
    main = threading.get_ident()

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        assert threading.get_ident() == main  # on the event loop: the disk is fast
        real_fsync(fd)

    def rename(src: str | Path, dst: str | Path) -> None:
        real_rename(src, dst)
        events.append(("rename", os.path.realpath(dst)))

    # The reception calls os.fsync and os.rename: patched on the os module itself.
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)

    async def one(i: int) -> str:
        reception = spool.receive(make_envelope())
        reception.write(MESSAGE + b"%d\r\n" % i)
        await asyncio.sleep(0)
        qid = await reception.commit()
        events.append(("ack", qid))
        return qid

    qids = await asyncio.gather(*(one(i) for i in range(20)))
    assert spool.list(Queue.INCOMING) == sorted(qids)
    assert names(spool, "tmp") == []
    root = os.path.realpath(spool.root)
    directory_syncs = [n for n, e in enumerate(events) if e == ("fsync", f"{root}/incoming")]
    assert 1 <= len(directory_syncs) < 20  # batched
    for i, qid in enumerate(qids):
        moved = events.index(("rename", f"{root}/incoming/{qid}"))
        acked = events.index(("ack", qid))
        synced = events.index(("fsync", f"{root}/tmp/{qid}"))
        # File fsync'd, then renamed, then the directory fsync'd, and only then the 250.
        assert synced < moved < acked
        assert any(moved < n < acked for n in directory_syncs), qid
        assert spool.load(qid, Queue.INCOMING).read_content() == MESSAGE + b"%d\r\n" % i


async def test_a_slow_disk_sends_the_commits_to_a_thread(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reception_module, "SLOW_BATCH_SECONDS", 0.0)
    threads: list[int] = []
    real_finish = Reception.finish_file

    def finish(self: Reception, *, sync: bool = True) -> None:
        threads.append(threading.get_ident())
        real_finish(self, sync=sync)

    monkeypatch.setattr(Reception, "finish_file", finish)
    for _ in range(2):
        reception = spool.receive(make_envelope())
        reception.write(MESSAGE)
        await reception.commit()
    main = threading.get_ident()
    assert threads[0] == main  # the first batch ran on the loop, and took "too long"
    assert threads[1] != main
    assert len(spool.list(Queue.INCOMING)) == 2


async def test_a_reserved_file_takes_one_fsync_and_is_no_message_before(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert spool.reserved is not None
    spool.reserved.refill()
    reserved = names(spool, "incoming")
    assert len(reserved) == 2
    for qid in reserved:
        assert (spool.root / "incoming" / qid).stat().st_mode & 0o777 == 0o200
        # Not a message yet: no listing, count, lookup or load takes it for one.
        assert spool.locate(qid) is None
        assert spool.load_if_present(qid, Queue.INCOMING) is None
        with pytest.raises(InProgress):
            spool.load(qid, Queue.INCOMING)
    assert spool.list(Queue.INCOMING) == [] and spool.counts()[Queue.INCOMING] == 0

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    reception = spool.receive(make_envelope())
    queue_id = reception.envelope.queue_id
    assert queue_id == reserved[0]  # the message takes the reserved file's queue id
    reception.write(MESSAGE)
    await reception.submit()  # as the SMTP session waits for its 250
    # One flush before the 250: the file's. Its name in incoming/ was durable already.
    assert synced == [os.path.realpath(spool.root / "incoming" / queue_id)]
    assert (spool.root / "incoming" / queue_id).stat().st_mode & 0o777 == 0o600
    assert spool.list(Queue.INCOMING) == [queue_id] and spool.locate(queue_id) is Queue.INCOMING
    assert spool.load(queue_id, Queue.INCOMING).read_content() == MESSAGE
    assert names(spool, "tmp") == []

    await asyncio.sleep(0)  # after the batch: the pool is down to half and topped up
    assert len(spool.reserved) == 2
    assert len(names(spool, "incoming")) == 3
    assert synced[1:] == [os.path.realpath(spool.root / "incoming")]  # one fsync for both

    aborted = spool.receive(make_envelope())
    aborted.write(MESSAGE)
    aborted.abort()  # its reserved file is given up with it
    assert aborted.envelope.queue_id not in names(spool, "incoming")

    report = spool.recover()  # reserved files left over are no message: removed
    assert names(spool, "incoming") == [queue_id]
    assert report.removed_temp == 1


async def test_a_reception_cut_off_in_a_reserved_file_leaves_nothing(spool: Spool) -> None:
    assert spool.reserved is not None
    spool.reserved.refill()
    half = spool.receive(make_envelope())
    half.write(MESSAGE * 100_000)  # spilled to the file, the mode still says reserved
    assert half._file is not None
    half._file.close()  # the process dies here
    half._file = None
    assert spool.list(Queue.INCOMING) == []
    report = spool.recover()
    assert names(spool, "incoming") == [] and report.removed_temp == 2


async def test_after_the_commit_the_session_replies_before_anything_else_runs(
    spool: Spool,
) -> None:
    """The log line, the scheduler's notice and new reserved files come after the 250."""
    assert spool.reserved is not None
    spool.reserved.refill()
    order: list[str] = []
    real_refill = spool.reserved.refill

    def refill() -> None:
        order.append("refill")
        real_refill()

    spool.committer.after_batch = refill  # what the committer calls after each batch

    async def session(i: int) -> None:
        reception = spool.receive(make_envelope())
        reception.write(MESSAGE)
        await reception.submit(lambda: order.append(f"durable {i}"))
        order.append(f"reply {i}")

    await asyncio.gather(session(1), session(2))
    for _ in range(3):
        await asyncio.sleep(0)
    assert order == ["reply 1", "reply 2", "durable 1", "durable 2", "refill"]
    assert len(spool.list(Queue.INCOMING)) == 2


async def test_a_session_cancelled_during_its_commit_leaves_the_message_queued(
    spool: Spool,
) -> None:
    """A client that hangs up while its fsync runs gets no 250, but the message is not
    withdrawn half-way: it is queued and the scheduler hears of it."""
    envelope = make_envelope()
    reception = spool.receive(envelope)
    reception.write(MESSAGE)
    durable = asyncio.Event()
    waiting = asyncio.ensure_future(reception.submit(durable.set))
    waiting.cancel()
    await asyncio.wait_for(durable.wait(), 5)
    assert waiting.cancelled()
    assert spool.list(Queue.INCOMING) == [envelope.queue_id] and names(spool, "tmp") == []
    assert spool.load(envelope.queue_id, Queue.INCOMING).read_content() == MESSAGE


async def test_when_no_file_is_reserved_a_reception_creates_its_own(spool: Spool) -> None:
    receptions = [spool.receive(make_envelope()) for _ in range(3)]  # none reserved yet
    for r in receptions:
        r.write(MESSAGE)
    await asyncio.gather(*(r.commit() for r in receptions))
    assert len(spool.list(Queue.INCOMING)) == 3


async def test_small_content_is_written_in_one_call_at_commit(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real_writev = os.writev

    def writev(fd: int, buffers: list[bytes]) -> int:
        calls.append(fd)
        return real_writev(fd, buffers)

    monkeypatch.setattr(os, "writev", writev)  # the reception calls os.writev
    envelope: Envelope = make_envelope()
    reception = spool.receive(envelope)
    for i in range(100):
        reception.write(b"line %d\r\n" % i)
    assert calls == []  # nothing written while receiving
    await reception.commit()
    assert len(calls) == 1
    expected = b"".join(b"line %d\r\n" % i for i in range(100))
    assert spool.load(envelope.queue_id, Queue.INCOMING).read_content() == expected


def test_the_envelope_json_holds_every_field() -> None:
    # Written field by field for speed: a field added to Envelope must not be left out.
    envelope = make_envelope(recipients=("a@x.example", "b@y.example"), smtputf8=True)
    data = json.loads(envelope.to_json())
    assert data == {**dataclasses.asdict(envelope), "recipients": list(envelope.recipients)}
    assert Envelope.from_json(envelope.to_json()) == envelope


async def test_a_delivered_file_is_reused_and_keeps_nothing_of_its_old_message(
    tmp_path: Path,
) -> None:
    # The main process: a long message, then a short one, delivered; their files go to
    # free/ instead of being deleted.
    main = Spool(tmp_path, reuse_files=True)
    main.prepare()
    old = [make_envelope(), make_envelope()]
    for envelope, content in zip(old, (b"OLD" * 5000, b"old"), strict=True):
        reception = main.receive(envelope)
        reception.write(content)
        await reception.commit()
        main.move(envelope.queue_id, Queue.INCOMING, Queue.ACTIVE)
        main.retire(envelope.queue_id, Queue.ACTIVE)
    assert names(main, "free") == sorted(e.queue_id for e in old)
    assert names(main, "active") == []
    inodes = {(main.root / "free" / e.queue_id).stat().st_ino for e in old}

    # An accepting process reserves them in incoming/ for its receptions.
    spool = Spool(tmp_path, commit_in_loop=True, reserved_files=2)
    assert spool.reserved is not None
    spool.reserved.refill()
    assert names(spool, "free") == []
    new: dict[bytes, str] = {}
    for content in (b"short", b"LONGER " * 3000):
        reception = spool.receive(make_envelope())
        reception.write(content)
        new[content] = await reception.commit()
    reused = {(spool.root / "incoming" / qid).stat().st_ino for qid in new.values()}
    assert reused == inodes  # the same files, no new inode
    for content, qid in new.items():
        msg = spool.load(qid, Queue.INCOMING)  # whole: trailer and length check
        assert msg.read_content() == content
        data = (spool.root / "incoming" / qid).read_bytes()
        assert b"OLD" not in data and b"old" not in data


async def test_free_files_are_bounded_and_removed_at_start(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "FREE_FILES", 2)
    spool.reuse_files = True
    spool.committer.after_batch = None  # nobody takes files back out of free/ while it fills
    for _ in range(4):
        envelope = make_envelope()
        reception = spool.receive(envelope)
        reception.write(MESSAGE)
        await reception.commit()
        spool.write_state(envelope.queue_id, DeliveryState(attempts=1))
        spool.retire(envelope.queue_id, Queue.INCOMING)
    assert len(names(spool, "free")) == 2  # the others were deleted
    assert spool.list(Queue.INCOMING) == names(spool, "state") == []
    spool.recover()
    assert names(spool, "free") == []


async def test_without_accepting_processes_done_files_are_deleted(tmp_path: Path) -> None:
    spool = Spool(tmp_path)  # nobody would reuse them
    spool.prepare()
    envelope = make_envelope()
    reception = spool.receive(envelope)
    reception.write(MESSAGE)
    await reception.commit()
    spool.retire(envelope.queue_id, Queue.INCOMING)
    assert spool.list(Queue.INCOMING) == names(spool, "free") == []


def test_accepting_processes_take_their_own_shares_of_the_free_files_first(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    spool.prepare()
    names_in_free = [f"0660C47B815188{i:06X}" for i in range(40)]
    for name in names_in_free:
        (spool.root / "free" / name).write_bytes(b"old")
    first = pool_of(spool, 10, (0, 2))
    second = pool_of(spool, 10, (1, 2))
    first.refill()
    second.refill()
    for pool in (first, second):
        assert len(pool) == 10
        assert all(r.reused for r in pool._ready)
    left = names(spool, "free")  # ten of each share: neither took from the other's
    assert sorted(reserved_module._share_of(name, 2) for name in left) == [0] * 10 + [1] * 10
    first.close()
    second.close()


def test_a_lone_accepting_process_also_takes_the_others_free_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.prepare()
    for i in range(6):
        (spool.root / "free" / f"0660C47B815188{2 * i + 1:06X}").write_bytes(b"old")  # odd
    lone = pool_of(spool, 4, (0, 2))
    # Another process took one of the listed files first: skipped, not an error.
    probe = lone._reuse(spool.root / "incoming" / "0000PROBE00000000000", "0000PROBE00000000000")
    assert probe is not None
    os.close(probe.fd)
    os.unlink(spool.root / "incoming" / probe.queue_id)
    taken_by_other = names(spool, "free")[0]
    os.unlink(spool.root / "free" / taken_by_other)
    lone.refill()
    assert len(lone) == 4 and all(r.reused for r in lone._ready)
    assert len(names(spool, "free")) == 0
    lone.close()
