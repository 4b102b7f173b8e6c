"""Spool files sealed with spool.key (SPEC ``spool.encrypt_at_rest``): nothing readable on
disk, everything back byte for byte, and any change to a file refused rather than sent."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from factories import make_envelope

from relayd.core.envelope import DeliveryState
from relayd.core.queues import Queue
from relayd.errors import SpoolError
from relayd.spool.sealing import SEGMENT, FileCipher, SpoolKey, plaintext_length
from relayd.spool.store import Spool

KEY = SpoolKey(b"k" * 32, seal_new=True)
SIZES = [0, 1, 4096, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT, 3 * SEGMENT + 17]


def sealed_content(size: int, *, seed: int = 0) -> tuple[bytes, bytes, FileCipher]:
    rng = random.Random(seed)
    content = rng.randbytes(size)
    _, cipher = KEY.new_file("0000TEST000000000001")
    sealer = cipher.sealer()
    sealed = b""
    position = 0
    while position < size:  # pieces of any size, as an SMTP session writes them
        step = rng.randint(1, 50_000)
        sealed += b"".join(sealer.feed(content[position : position + step]))
        position += step
    sealed += sealer.finish()
    return content, sealed, cipher


@pytest.mark.parametrize("size", SIZES)
def test_content_comes_back_whole_from_segments_of_any_split(size: int) -> None:
    content, sealed, cipher = sealed_content(size)
    assert plaintext_length(len(sealed)) == size
    assert cipher.open_all(sealed) == content
    if size >= 64:
        assert content[:64] not in sealed


@pytest.mark.parametrize(
    "damage",
    ["flip a byte", "cut the last segment", "cut inside a segment", "swap segments"],
)
def test_any_change_to_the_sealed_content_is_refused(damage: str) -> None:
    _, sealed, cipher = sealed_content(3 * SEGMENT + 100)
    whole = SEGMENT + 16
    if damage == "flip a byte":
        sealed = sealed[:5000] + bytes([sealed[5000] ^ 1]) + sealed[5001:]
    elif damage == "cut the last segment":
        sealed = sealed[: 3 * whole]  # three whole segments: a clean cut at a boundary
    elif damage == "cut inside a segment":
        sealed = sealed[:-50]
    else:
        sealed = sealed[whole : 2 * whole] + sealed[:whole] + sealed[2 * whole :]
    with pytest.raises(SpoolError, match=r"does not open with spool\.key"):
        cipher.open_all(sealed)


def test_another_key_or_another_queue_id_does_not_open_a_file() -> None:
    salt, cipher = KEY.new_file("0000TEST000000000001")
    sealed = cipher.seal_envelope(b'{"queue_id": "0000TEST000000000001"}')
    other_key = SpoolKey(b"j" * 32, seal_new=True).for_file(salt, "0000TEST000000000001")
    other_name = KEY.for_file(salt, "0000TEST000000000002")
    for wrong in (other_key, other_name):
        with pytest.raises(SpoolError, match="does not open"):
            wrong.open_envelope(sealed)
    assert KEY.for_file(salt, "0000TEST000000000001").open_envelope(sealed).startswith(b"{")


# -- sealed files in the spool -----------------------------------------------------------------


def sealed_spool(path: Path, key: SpoolKey | None = KEY) -> Spool:
    spool = Spool(path, key=key)
    spool.prepare()
    return spool


async def store(spool: Spool, content: bytes, chunk: int = 4096) -> str:
    reception = spool.receive(make_envelope(sender="alice.secret@acme.example"))
    for i in range(0, len(content), chunk):
        reception.write(content[i : i + chunk])
    return await reception.commit()


BIG = b"".join(b"Line %06d of an invoice nobody else may read\r\n" % i for i in range(20_000))


@pytest.mark.parametrize("content", [b"Subject: hi\r\n\r\nsmall secret\r\n", BIG])
async def test_a_sealed_message_shows_nothing_on_disk_and_reads_back_exactly(
    tmp_path: Path, content: bytes
) -> None:
    spool = sealed_spool(tmp_path)
    queue_id = await store(spool, content)
    raw = (spool.root / "incoming" / queue_id).read_bytes()
    assert raw.startswith(b"RELAYD1S ")
    for clear in (b"secret", b"invoice", b"alice.secret", b"bob@example.net"):
        assert clear not in raw
    for preload in (0, 1 << 22):  # streamed from the file, and read whole with the envelope
        msg = spool.load(queue_id, Queue.INCOMING, preload=preload)
        assert msg.envelope.sender == "alice.secret@acme.example"
        assert msg.content_length == len(content)
        assert msg.read_content() == content
        assert b"".join(msg.iter_content(10_000)) == content
        assert all(len(c) <= 10_000 for c in msg.iter_content(10_000))


async def test_plain_files_stay_readable_and_sealed_ones_need_the_key(tmp_path: Path) -> None:
    plain = sealed_spool(tmp_path, key=None)
    plain_id = await store(plain, b"Subject: before\r\n\r\nwritten in clear\r\n")
    sealing = sealed_spool(tmp_path)
    sealed_id = await store(sealing, b"Subject: after\r\n\r\nsealed\r\n")
    assert sealing.load(plain_id, Queue.INCOMING).read_content().endswith(b"in clear\r\n")
    # encrypt_at_rest turned off, key kept: old sealed files open, new ones are plain.
    opening = sealed_spool(tmp_path, key=SpoolKey(b"k" * 32, seal_new=False))
    assert opening.load(sealed_id, Queue.INCOMING).read_content().endswith(b"sealed\r\n")
    later_id = await store(opening, b"Subject: later\r\n\r\nclear again\r\n")
    assert b"clear again" in (opening.root / "incoming" / later_id).read_bytes()
    with pytest.raises(SpoolError, match="none is configured"):
        plain.load(sealed_id, Queue.INCOMING)
    with pytest.raises(SpoolError, match=r"does not open with spool\.key"):
        sealed_spool(tmp_path, key=SpoolKey(b"j" * 32, seal_new=True)).load(
            sealed_id, Queue.INCOMING
        )


async def test_a_damaged_sealed_file_is_quarantined_at_start(tmp_path: Path) -> None:
    spool = sealed_spool(tmp_path)
    good = await store(spool, BIG)
    bad = await store(spool, BIG)
    path = spool.root / "incoming" / bad
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # one bit, in the middle of the content
    path.write_bytes(bytes(data))
    os.chmod(path, 0o600)
    report = spool.recover()
    assert report.quarantined == 0  # the end record still matches: the damage is inside
    msg = spool.load(bad, Queue.INCOMING)
    with pytest.raises(SpoolError, match="does not open"):
        b"".join(msg.iter_content())
    assert spool.load(good, Queue.INCOMING).read_content() == BIG


def test_delivery_state_is_sealed_too_and_read_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = sealed_spool(tmp_path)
    state = DeliveryState(attempts=2, delivered=("bob@example.net",), last_reply="451 4.3.0 busy")
    spool.write_state("0000TEST000000000001", state)
    raw = (spool.root / "state" / "0000TEST000000000001.json").read_bytes()
    assert raw.startswith(b"RELAYD1S ") and b"bob@example.net" not in raw and b"busy" not in raw
    assert spool.read_state("0000TEST000000000001") == state
    # Written again: a new salt, so different bytes for the same state.
    spool.write_state("0000TEST000000000001", state)
    assert (spool.root / "state" / "0000TEST000000000001.json").read_bytes() != raw
    # Plain state files from before encryption are still read.
    plain = sealed_spool(tmp_path, key=None)
    plain.write_state("0000TEST000000000002", state)
    assert spool.read_state("0000TEST000000000002") == state
    # Renamed to another message, or without the key: not opened (and said so).
    os.rename(
        spool.root / "state" / "0000TEST000000000001.json",
        spool.root / "state" / "0000TEST000000000003.json",
    )
    assert spool.read_state("0000TEST000000000003") == DeliveryState()
    assert plain.read_state("0000TEST000000000003") == DeliveryState()
    assert "delivery state does not open with spool.key" in caplog.text
    assert "none is configured" in caplog.text


async def test_a_reused_file_keeps_nothing_of_its_old_sealed_message(tmp_path: Path) -> None:
    spool = Spool(tmp_path, key=KEY, commit_in_loop=True, reserved_files=1, reuse_files=True)
    spool.prepare()
    old_id = await store(spool, BIG)
    spool.retire(old_id, Queue.INCOMING, has_state=False)
    assert os.listdir(spool.root / "free") == [old_id]
    assert spool.reserved is not None
    spool.reserved.close()  # the file reserved after the commit: given up, so free/ is used
    spool.reserved._free_listed = 0.0  # free/ may be listed again at once
    spool.reserved.refill()
    assert os.listdir(spool.root / "free") == []  # the delivered file is reserved now
    small = b"Subject: short\r\n\r\nafter a long one\r\n"
    new_id = await store(spool, small)
    path = spool.root / "incoming" / new_id
    assert spool.load(new_id, Queue.INCOMING).read_content() == small
    assert path.stat().st_size < 1024  # cut to the new message's length
