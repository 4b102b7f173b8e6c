"""Accepting processes → scheduler: announcements, and the scan that catches lost ones."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from relayd.queue.arrivals import Announcer, ArrivalInbox, arrival_channel

QID_A = "0660C47B81518873ED94"
QID_B = "0660C47B81556CA102C4"


class Heard:
    def __init__(self) -> None:
        self.arrivals: list[tuple[str, str | None]] = []
        self.ready: list[int] = []
        self.known: set[str] = set()

    def arrival(self, queue_id: str, account: str | None) -> None:
        self.arrivals.append((queue_id, account))
        self.known.add(queue_id)


def inbox_for(tmp_path: Path, heard: Heard) -> tuple[ArrivalInbox, Announcer]:
    inbox_end, announcer_end = arrival_channel()
    inbox = ArrivalInbox(
        inbox_end,
        tmp_path,
        on_arrival=heard.arrival,
        knows=heard.known.__contains__,
        on_ready=heard.ready.append,
        scan_seconds=3600,
    )
    return inbox, Announcer(announcer_end)


async def test_announcements_of_one_loop_turn_travel_together(tmp_path: Path) -> None:
    heard = Heard()
    inbox, announcer = inbox_for(tmp_path, heard)
    inbox.start()
    sent: list[bytes] = []
    real_send = announcer._send

    def count(datagram: bytes) -> None:
        sent.append(datagram)
        real_send(datagram)

    announcer._send = count  # type: ignore[method-assign]
    announcer.announce(QID_A, "alice@acme.example")
    announcer.announce(QID_B, "bob smith@acme.example")  # a space in the local part
    announcer.ready()
    for _ in range(50):
        await asyncio.sleep(0.01)
        if len(heard.arrivals) == 2 and heard.ready:
            break
    await inbox.stop()
    assert heard.arrivals == [(QID_A, "alice@acme.example"), (QID_B, "bob smith@acme.example")]
    assert heard.ready == [os.getpid()]
    assert len(sent) == 2  # the two queue ids in one datagram, then the ready notice


async def test_garbage_on_the_socket_is_ignored(tmp_path: Path) -> None:
    heard = Heard()
    inbox, announcer = inbox_for(tmp_path, heard)
    inbox.start()
    announcer.sock.send(b"../../etc/passwd x\n+ready:abc\n\n" + QID_A.encode() + b"\n")
    for _ in range(50):
        await asyncio.sleep(0.01)
        if heard.arrivals:
            break
    await inbox.stop()
    assert heard.arrivals == [(QID_A, None)]
    assert heard.ready == []


async def test_the_scan_adopts_what_waited_unannounced_for_two_looks(tmp_path: Path) -> None:
    heard = Heard()
    inbox, _ = inbox_for(tmp_path, heard)
    (tmp_path / QID_A).write_bytes(b"lost announcement")
    (tmp_path / QID_B).write_bytes(b"announced")
    (tmp_path / "not-a-queue-id").write_bytes(b"")
    heard.known.add(QID_B)
    assert await inbox.scan() == 0  # first look: it may be announced in a moment
    assert heard.arrivals == []
    assert await inbox.scan() == 1
    assert heard.arrivals == [(QID_A, None)]
    assert await inbox.scan() == 0  # known now


async def test_the_scan_passes_over_files_reserved_for_receptions(tmp_path: Path) -> None:
    heard = Heard()
    inbox, _ = inbox_for(tmp_path, heard)
    reserved = tmp_path / QID_A
    reserved.write_bytes(b"being written")
    os.chmod(reserved, 0o200)  # relayd.spool.reserved: not a message yet
    for _ in range(3):
        assert await inbox.scan() == 0
    assert heard.arrivals == []
    os.chmod(reserved, 0o600)  # complete, and its announcement lost: the scan finds it
    assert await inbox.scan() == 1
    assert heard.arrivals == [(QID_A, None)]
