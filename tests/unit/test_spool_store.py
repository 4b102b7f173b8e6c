"""The durable spool: what a 250 promises (SPEC "SMTP towards clients", RFC 5321 §6.1)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from factories import make_envelope, place

from relayd.core.envelope import DeliveryState, Envelope
from relayd.core.queues import Queue
from relayd.errors import SpoolError
from relayd.spool.reception import GroupCommitter, Reception
from relayd.spool.store import Spool, new_queue_id

DIRS = ("tmp", *(q.value for q in Queue), "state")
TRAILER_LEN = len(b"\r\nRELAYD-END ") + 16 + 2
MESSAGE = b"From: alice@acme.example\r\nSubject: hi\r\n\r\nHello\r\n.dot line\r\n"


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path)
    s.prepare()
    return s


def names(spool: Spool, queue: str) -> list[str]:
    return sorted(os.listdir(spool.root / queue))


async def store(
    spool: Spool, content: bytes, envelope: Envelope | None = None, chunk: int = 4096
) -> str:
    reception = spool.receive(envelope or make_envelope())
    for i in range(0, len(content), chunk):
        reception.write(content[i : i + chunk])
    return await reception.commit()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- layout and permissions ------------------------------------------------------------------------


def test_prepare_creates_private_directories(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        spool = Spool(tmp_path / "state")
        spool.prepare()
        spool.prepare()  # idempotent
    finally:
        os.umask(old)
    assert mode(spool.root) == 0o700
    for name in DIRS:
        assert mode(spool.root / name) == 0o700, name
    assert spool.counts() == dict.fromkeys(Queue, 0)


# -- receive, write, commit, load ----------------------------------------------------------------

CONTENTS = [
    pytest.param(b"", id="empty"),
    pytest.param(MESSAGE, id="plain"),
    pytest.param(MESSAGE + b"\r\nRELAYD-END 0000000000000000\r\n", id="fake-trailer-inside"),
    pytest.param(b"RELAYD1 12\r\n{}\r\n" + MESSAGE, id="fake-header-inside"),
    pytest.param(bytes(range(256)) * 4, id="all-byte-values"),
    pytest.param("Grüße, 你好\r\n".encode() * 100, id="utf8"),
    pytest.param(os.urandom(300_000), id="300k-binary"),
]


@pytest.mark.parametrize("content", CONTENTS)
@pytest.mark.parametrize("fsync", [True, False], ids=["fsync", "no-fsync"])
async def test_commit_puts_the_exact_message_in_incoming(
    tmp_path: Path, content: bytes, fsync: bool
) -> None:
    spool = Spool(tmp_path, fsync=fsync)
    spool.prepare()
    envelope = make_envelope(recipients=("b@x.example", "c@x.example"), smtputf8=True)
    qid = await store(spool, content, envelope, chunk=1000)
    assert qid == envelope.queue_id
    assert names(spool, "incoming") == [qid]
    assert names(spool, "tmp") == []
    assert mode(spool.root / "incoming" / qid) == 0o600
    assert spool.locate(qid) == Queue.INCOMING
    msg = spool.load(qid, Queue.INCOMING)
    assert msg.envelope == envelope
    assert msg.queue is Queue.INCOMING
    assert msg.content_length == len(content)
    assert msg.read_content() == content
    assert b"".join(msg.iter_content(chunk_size=7)) == content


async def test_abort_leaves_nothing(spool: Spool) -> None:
    reception = spool.receive(make_envelope())
    assert names(spool, "tmp") == [reception.queue_id]
    reception.write(MESSAGE * 5000)  # beyond the write buffer, so some of it is on disk
    reception.abort()
    reception.abort()  # twice is harmless
    for name in DIRS:
        assert names(spool, name) == [], name


async def test_abort_right_after_receive(spool: Spool) -> None:
    spool.receive(make_envelope()).abort()
    assert names(spool, "tmp") == []


async def test_receive_errors_are_spool_errors(tmp_path: Path, spool: Spool) -> None:
    envelope = make_envelope()
    first = spool.receive(envelope)
    with pytest.raises(SpoolError):
        spool.receive(envelope)  # the same queue id twice
    first.write(MESSAGE)
    assert await first.commit() == envelope.queue_id
    assert spool.load(envelope.queue_id, Queue.INCOMING).read_content() == MESSAGE
    with pytest.raises(SpoolError):
        Spool(tmp_path / "never-prepared").receive(make_envelope())


def test_new_queue_id() -> None:
    ids = [new_queue_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 20 and int(i, 16) >= 0 for i in ids)
    prefixes = [i[:14] for i in ids]
    assert prefixes == sorted(prefixes)  # sortable by arrival time


async def test_move_and_remove(spool: Spool) -> None:
    qid = await store(spool, MESSAGE)
    spool.write_state(qid, DeliveryState(attempts=1))
    place(spool, qid, Queue.DEFERRED)
    assert names(spool, "incoming") == []
    assert spool.locate(qid) == Queue.DEFERRED
    assert spool.load(qid, Queue.DEFERRED).read_content() == MESSAGE
    spool.remove(qid, Queue.DEFERRED)
    assert spool.locate(qid) is None
    assert names(spool, "state") == []
    spool.remove(qid, Queue.DEFERRED)  # already gone: no error


# -- group commit ---------------------------------------------------------------------------------


async def test_concurrent_commits_are_batched_and_each_durable(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[list[str]] = []

    class CountingCommitter(GroupCommitter):
        def _sync_batch(self, receptions: list[Reception]) -> list[Exception | None]:
            batches.append([r.queue_id for r in receptions])
            return super()._sync_batch(receptions)

    spool.committer = CountingCommitter(spool.directory(Queue.INCOMING))
    events: list[tuple[str, ...]] = []  # list.append is atomic: threads may record too
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(src: str | Path, dst: str | Path) -> None:
        real_rename(src, dst)
        events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))

    # The store calls os.fsync and os.rename: patched on the os module itself.
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)

    async def one(i: int) -> str:
        reception = spool.receive(make_envelope(queue_id=f"C{i:019d}"))
        reception.write(b"Subject: %d\r\n\r\n" % i)
        await asyncio.sleep(0)
        reception.write(b"body %d\r\n" % i * (i + 1))
        qid = await reception.commit()
        events.append(("ack", qid))
        return qid

    qids = await asyncio.gather(*(one(i) for i in range(50)))

    assert sorted(qids) == names(spool, "incoming")
    assert len(set(qids)) == 50
    assert names(spool, "tmp") == []
    assert sorted(q for b in batches for q in b) == sorted(qids)  # each synced exactly once
    assert len(batches) < 50
    root = os.path.realpath(spool.root)
    incoming_syncs = [n for n, e in enumerate(events) if e == ("fsync", f"{root}/incoming")]
    assert 1 <= len(incoming_syncs) < 50
    for i, qid in enumerate(qids):
        msg = spool.load(qid, Queue.INCOMING)
        assert msg.read_content() == b"Subject: %d\r\n\r\n" % i + b"body %d\r\n" % i * (i + 1)
        tmp, final = f"{root}/tmp/{qid}", f"{root}/incoming/{qid}"
        synced = events.index(("fsync", tmp))
        moved = events.index(("rename", tmp, final))
        acked = events.index(("ack", qid))
        # File fsync'd, then renamed, then the directory fsync'd, and only then the 250.
        assert synced < moved < acked
        assert any(moved < n < acked for n in incoming_syncs), qid


async def test_a_cancelled_commit_does_not_fail_the_rest_of_its_batch(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # aiosmtpd cancels the handler when a client hangs up, e.g. right after its final ".".
    entered, release = threading.Event(), threading.Event()
    receptions = [spool.receive(make_envelope()) for _ in range(3)]
    for r in receptions:
        r.write(MESSAGE)
    first = receptions[0]
    real_finish = Reception.finish_file

    def gated_finish(self: Reception, *, sync: bool = True) -> None:
        if self is first:
            entered.set()
            release.wait(10)
        real_finish(self, sync=sync)

    monkeypatch.setattr(Reception, "finish_file", gated_finish)
    tasks = [asyncio.create_task(r.commit()) for r in receptions]
    try:
        assert await asyncio.to_thread(entered.wait, 10)
        tasks[1].cancel()  # the client of the middle reception hangs up
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
    finally:
        release.set()
    results = list(await asyncio.gather(tasks[0], tasks[2], return_exceptions=True))
    assert results == [receptions[0].queue_id, receptions[2].queue_id]
    for qid in results:
        assert spool.load(str(qid), Queue.INCOMING).read_content() == MESSAGE


# -- recovery at start ----------------------------------------------------------------------------


def _retrailer(data: bytes, delta: int) -> bytes:
    length = int(data[-18:-2], 16)
    return data[:-18] + f"{length + delta:016X}".encode() + b"\r\n"


def _new_envelope_bytes(data: bytes, envelope: bytes) -> bytes:
    first, rest = data.split(b"\r\n", 1)
    header_len = int(first[len(b"RELAYD1 ") :])
    return b"RELAYD1 %d\r\n" % len(envelope) + envelope + rest[header_len:]


CORRUPTIONS: list[object] = [
    pytest.param(lambda d: d[:-1], id="last-byte-cut"),
    pytest.param(lambda d: d[:-5], id="last-5-bytes-cut"),
    pytest.param(lambda d: d[:-TRAILER_LEN], id="trailer-missing"),
    pytest.param(lambda d: d[: len(d) // 2], id="cut-in-content"),
    pytest.param(lambda d: d[:40], id="cut-in-envelope"),
    pytest.param(lambda d: d[:5], id="cut-in-header-line"),
    pytest.param(lambda d: b"", id="empty"),
    pytest.param(lambda d: b"GARBAGE!" + d[8:], id="garbage-magic"),
    pytest.param(lambda d: b"RELAYD1 xyz\r\n" + d.split(b"\r\n", 1)[1], id="garbage-length"),
    pytest.param(lambda d: os.urandom(len(d)), id="random-bytes"),
    pytest.param(lambda d: _retrailer(d, +1), id="trailer-length-too-big"),
    pytest.param(lambda d: _retrailer(d, -1), id="trailer-length-too-small"),
    pytest.param(lambda d: d[:-2] + b"\n\n", id="trailer-without-crlf"),
    pytest.param(lambda d: d + b"x", id="bytes-after-trailer"),
    pytest.param(lambda d: _new_envelope_bytes(d, b"not json"), id="envelope-not-json"),
    pytest.param(lambda d: _new_envelope_bytes(d, b'{"queue_id":"x"}'), id="envelope-fields"),
    pytest.param(lambda d: _new_envelope_bytes(d, b"[1,2]"), id="envelope-not-object"),
]


@pytest.mark.parametrize("queue", ["incoming", "deferred", "hold", "active"])
@pytest.mark.parametrize("corrupt", CORRUPTIONS)
async def test_recover_quarantines_damaged_files(
    spool: Spool, corrupt: Callable[[bytes], bytes], queue: str
) -> None:
    good = {q: await store(spool, MESSAGE + q.encode()) for q in ("incoming", "deferred", "hold")}
    for q, qid in good.items():
        if q != "incoming":
            place(spool, qid, q)
    bad = await store(spool, MESSAGE * 3)
    path = spool.root / "incoming" / bad
    path.write_bytes(corrupt(path.read_bytes()))
    if queue != "incoming":
        place(spool, bad, queue)

    report = spool.recover()

    assert names(spool, "corrupt") == [bad]
    assert spool.locate(bad) == Queue.CORRUPT
    assert report.quarantined == 1
    assert report.queued == 3
    assert report.requeued_active == (1 if queue == "active" else 0)
    for q, qid in good.items():
        assert names(spool, q) == [qid]
        assert spool.load(qid, Queue(q)).read_content() == MESSAGE + q.encode()
    assert names(spool, "active") == []


async def test_recover_quarantines_a_file_under_another_queue_id(spool: Spool) -> None:
    qid = await store(spool, MESSAGE)
    os.rename(spool.root / "incoming" / qid, spool.root / "incoming" / "0000RENAMED000000000")
    report = spool.recover()
    assert report.quarantined == 1
    assert names(spool, "corrupt") == ["0000RENAMED000000000"]
    assert names(spool, "incoming") == []


async def test_recover_cleans_tmp_and_requeues_active(spool: Spool) -> None:
    # A reception that never got its 250: complete-looking or half-written, never delivered.
    done = await store(spool, MESSAGE)
    os.rename(spool.root / "incoming" / done, spool.root / "tmp" / done)
    half = spool.receive(make_envelope())
    half.write(MESSAGE * 10_000)
    assert half._file is not None
    half._file.close()  # the process dies here: the file stays in tmp/
    half._file = None
    # Messages interrupted mid-delivery go out again (at-least-once).
    active = [await store(spool, MESSAGE + b"%d" % i) for i in range(2)]
    for qid in active:
        spool.move(qid, Queue.INCOMING, Queue.ACTIVE)
    waiting = await store(spool, MESSAGE)

    report = spool.recover()

    assert names(spool, "tmp") == []
    assert report.removed_temp == 2
    assert report.requeued_active == 2
    assert report.quarantined == 0
    assert report.queued == 3
    assert names(spool, "active") == []
    assert names(spool, "incoming") == sorted([*active, waiting])
    assert done not in names(spool, "incoming")
    for i, qid in enumerate(active):
        assert spool.load(qid, Queue.INCOMING).read_content() == MESSAGE + b"%d" % i
    # Running it again changes nothing.
    again = spool.recover()
    assert (again.removed_temp, again.requeued_active, again.quarantined, again.queued) == (
        0,
        0,
        0,
        3,
    )


# -- delivery state files -------------------------------------------------------------------------


async def test_state_round_trip_is_atomic_and_private(spool: Spool) -> None:
    qid = await store(spool, MESSAGE)
    assert spool.read_state(qid) == DeliveryState()
    first = DeliveryState(attempts=1, first_attempt_at=1.0, next_attempt_at=301.0, delivered=("a",))
    spool.write_state(qid, first)
    assert spool.read_state(qid) == first
    second = first.but(attempts=2, bounced=("b@x",), last_reply="550 5.1.1 unknown")
    spool.write_state(qid, second)
    assert spool.read_state(qid) == second
    assert names(spool, "state") == [f"{qid}.json"]
    assert mode(spool.root / "state" / f"{qid}.json") == 0o600


async def test_state_write_interrupted_before_rename_keeps_the_old_state(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    qid = await store(spool, MESSAGE)
    old = DeliveryState(attempts=1, delivered=("a@x",))
    spool.write_state(qid, old)

    def crash(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "simulated crash before rename")

    monkeypatch.setattr(os, "rename", crash)  # the store calls os.rename
    with pytest.raises(OSError):
        spool.write_state(qid, old.but(attempts=2))
    monkeypatch.undo()
    assert spool.read_state(qid) == old
    assert f"{qid}.json.tmp" in names(spool, "state")
    spool.recover()
    assert names(spool, "state") == [f"{qid}.json"]
    assert spool.read_state(qid) == old


async def test_recover_removes_orphan_state_files(spool: Spool) -> None:
    kept = {}
    for queue in ("incoming", "deferred", "hold", "active"):
        qid = await store(spool, MESSAGE)
        if queue != "incoming":
            place(spool, qid, queue)
        spool.write_state(qid, DeliveryState(attempts=1, last_reply=queue))
        kept[qid] = queue
    spool.write_state("0000ORPHAN0000000000", DeliveryState(attempts=9))
    (spool.root / "state" / "0000OTHER00000000000.json.tmp").write_bytes(b"{")

    spool.recover()

    assert names(spool, "state") == sorted(f"{qid}.json" for qid in kept)
    for qid, queue in kept.items():
        assert spool.read_state(qid).last_reply == queue


@pytest.mark.parametrize(
    "garbage",
    [
        b"",
        b"{",
        b"\x00" * 32,
        b'{"attempts": 1, "bogus": 2}',
        b"[]",
        b"null",
    ],
)
async def test_unreadable_state_starts_afresh(spool: Spool, garbage: bytes) -> None:
    qid = await store(spool, MESSAGE)
    (spool.root / "state" / f"{qid}.json").write_bytes(garbage)
    assert spool.read_state(qid) == DeliveryState()


# -- disk full -------------------------------------------------------------------------------------


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str = "256k") -> Iterator[Path]:
    """A real, tiny filesystem; skips the calling test where mounting is not permitted."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"mount not permitted here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False)


async def test_disk_full_while_writing_a_message(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "tiny") as mnt:
        spool = Spool(mnt)
        spool.prepare()
        reception = spool.receive(make_envelope())
        line = b"x" * 998 + b"\r\n"
        with pytest.raises(OSError) as raised:
            for _ in range(1024):  # 1 MiB into 256 KiB
                reception.write(line)
            await reception.commit()
        reception.abort()
        assert isinstance(raised.value, SpoolError) or raised.value.errno == errno.ENOSPC
        for name in DIRS:
            assert names(spool, name) == [], name
        # The space is given back: the next message is accepted.
        qid = await store(spool, MESSAGE)
        assert spool.load(qid, Queue.INCOMING).read_content() == MESSAGE


async def test_disk_full_at_commit_is_a_spool_error_and_leaves_nothing(tmp_path: Path) -> None:
    with tiny_tmpfs(tmp_path / "tiny") as mnt:
        spool = Spool(mnt)
        spool.prepare()
        reception = spool.receive(make_envelope())
        reception.write(MESSAGE * 500)  # ~30 KiB: stays in the write buffer
        filler = mnt / "filler"
        with open(filler, "wb", buffering=0) as f, pytest.raises(OSError) as full:
            while True:
                f.write(b"\0" * 4096)
        assert full.value.errno == errno.ENOSPC
        with pytest.raises(SpoolError):
            await reception.commit()
        for name in DIRS:
            assert names(spool, name) == [], name
        filler.unlink()
        qid = await store(spool, MESSAGE)
        assert spool.load(qid, Queue.INCOMING).read_content() == MESSAGE
