"""The upstream DATA phase streamed from the spool (relayd.upstream.dataphase).

What the receiver gets, once it removes the transparency dots, is exactly
``as_delivered(content)`` (the bytes the Sent copy files): checked on the wire against a raw
SMTP server, for lines starting with ".", bare CR/LF, every way of cutting the content into
blocks, and a 25 MiB message read from its spool file without ever being held whole.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from factories import make_account, make_envelope

from relayd.config.model import AccountConfig, SmtpServer, TlsMode
from relayd.core.lines import as_delivered
from relayd.core.outcome import Verdict
from relayd.core.queues import Queue
from relayd.spool.store import Spool
from relayd.upstream.credentials import AccountCredentials
from relayd.upstream.dataphase import BytesContent, DotStuffer
from relayd.upstream.delivery import UpstreamDeliverer
from relayd.upstream.smtp import SmtpSession

# -- the transformation, pure ---------------------------------------------------------------


def wire_form(content: bytes) -> bytes:
    """The DATA section for ``content``, built the obvious way (RFC 5321 §4.5.2)."""
    delivered = as_delivered(content)
    lines = delivered.split(b"\r\n")[:-1] if delivered else []
    stuffed = [(b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines]
    return b"".join(stuffed) + b".\r\n"


def unstuff(section: bytes) -> bytes:
    """What a receiver makes of a DATA section (the final ".\\r\\n" included)."""
    assert section.endswith(b".\r\n") and (section == b".\r\n" or section.endswith(b"\r\n.\r\n"))
    body = section[:-3]
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def stuff_in_blocks(content: bytes, cuts: list[int]) -> bytes:
    stuffer = DotStuffer()
    out, start = [], 0
    for cut in [*cuts, len(content)]:
        out.append(stuffer.feed(content[start:cut]))
        start = cut
    return b"".join(out) + stuffer.end()


CASES = [
    pytest.param(b"", id="empty"),
    pytest.param(b"Subject: x\r\n\r\nbody\r\n", id="plain"),
    pytest.param(b".starts with a dot\r\n..two\r\n.\r\nend\r\n", id="dot-lines"),
    pytest.param(b"Subject: x\r\n\r\n.\r\n", id="lone-dot-line"),
    pytest.param(b"no final newline", id="no-final-crlf"),
    pytest.param(b"bare\nlf\rcr\r\n.dot\n.\rmix\r", id="bare-cr-lf"),
    pytest.param(b"\r\n.\r\n.\r\n", id="terminator-look-alikes"),
    pytest.param(bytes(range(1, 256)) * 3, id="all-bytes"),
]


@pytest.mark.parametrize("content", CASES)
def test_stuffing_matches_the_rfc_in_one_block(content: bytes) -> None:
    section = stuff_in_blocks(content, [])
    assert section == wire_form(content)
    assert unstuff(section) == as_delivered(content)


@pytest.mark.parametrize("content", CASES)
def test_every_cut_into_two_blocks_gives_the_same_section(content: bytes) -> None:
    whole = wire_form(content)
    for cut in range(len(content) + 1):
        assert stuff_in_blocks(content, [cut]) == whole, cut


def test_random_contents_in_random_blocks() -> None:
    rng = random.Random(5321)
    alphabet = b"..\r\r\n\nab"
    for _ in range(2000):
        content = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        cuts = sorted(rng.randrange(0, len(content) + 1) for _ in range(rng.randrange(0, 5)))
        assert stuff_in_blocks(content, cuts) == wire_form(content), (content, cuts)


def test_as_delivered_leaves_spooled_content_alone() -> None:
    # What the inbound side spools is CRLF throughout, ending in CRLF: delivered as it is.
    content = b"From: a@x\r\nSubject: s\r\n\r\n.line\r\n"
    assert as_delivered(content) is content
    assert as_delivered(b"a\nb") == b"a\r\nb\r\n"
    assert as_delivered(b"a\r") == b"a\r\n"


# -- on the wire ----------------------------------------------------------------------------


@dataclasses.dataclass
class RawSink:
    """A minimal SMTP server keeping each DATA section exactly as it came off the wire (or,
    for a big one, its digest and that of the content a receiver would make of it)."""

    sections: list[bytes] = dataclasses.field(default_factory=list)
    digests: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    port: int = 0
    pipelining: bool = False
    refused: tuple[bytes, ...] = ()  # RCPT TO addresses answered 550
    commands: list[bytes] = dataclasses.field(default_factory=list)

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink\r\n")
        accepted = 0
        while line := await reader.readline():
            verb = line[:4].upper()
            self.commands.append(line.rstrip())
            if verb == b"EHLO":
                extra = b"250-PIPELINING\r\n" if self.pipelining else b""
                writer.write(b"250-sink\r\n" + extra + b"250-8BITMIME\r\n250 SIZE 100000000\r\n")
            elif verb == b"RCPT":
                if any(address in line for address in self.refused):
                    writer.write(b"550 5.1.1 no such user\r\n")
                else:
                    accepted += 1
                    writer.write(b"250 2.1.5 ok\r\n")
            elif verb == b"DATA" and not accepted:
                writer.write(b"554 5.5.1 no valid recipients\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                await writer.drain()
                wire, unstuffed, small = hashlib.sha256(), hashlib.sha256(), bytearray()
                while (chunk := await reader.readline()) != b".\r\n":
                    if not chunk:
                        return
                    wire.update(chunk)
                    unstuffed.update(chunk[1:] if chunk.startswith(b".") else chunk)
                    if len(small) < 1 << 20:
                        small += chunk
                wire.update(b".\r\n")
                if len(small) < 1 << 20:
                    self.sections.append(bytes(small) + b".\r\n")
                self.digests.append((wire.hexdigest(), unstuffed.hexdigest()))
                accepted = 0
                writer.write(b"250 2.0.0 kept\r\n")
            elif verb == b"RSET":
                accepted = 0
                writer.write(b"250 2.0.0 reset\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()
        writer.close()


@pytest.fixture
async def raw_sink() -> AsyncIterator[RawSink]:
    sink = RawSink()
    server = await asyncio.start_server(sink.session, "127.0.0.1", 0, limit=1 << 20)
    sink.port = server.sockets[0].getsockname()[1]
    try:
        yield sink
    finally:
        server.close()
        await server.wait_closed()


async def test_the_session_puts_the_stuffed_section_on_the_wire(raw_sink: RawSink) -> None:
    content = b"Subject: dots\r\n\r\n.hidden\r\n..double\r\n.\r\nlast"
    session = SmtpSession(
        _account(raw_sink.port),
        helo_name="relayd.test",
        credentials=AccountCredentials(),
    )
    await session.open()
    for _ in range(2):  # the connection stays in step: the second goes the same way
        result = await session.send("a@x.test", ("b@y.test",), BytesContent(content))
        assert result.replies["b@y.test"][1].code == 250
    await session.quit()
    assert raw_sink.sections == [wire_form(content)] * 2
    assert unstuff(raw_sink.sections[0]) == as_delivered(content)


def _account(port: int) -> AccountConfig:
    account = make_account("app@example.test", password="pw-for-the-test")
    return dataclasses.replace(account, smtp=SmtpServer("127.0.0.1", port, TlsMode.NONE, None))


async def test_a_25_mib_message_is_streamed_from_its_spool_file(
    raw_sink: RawSink, tmp_path: Path
) -> None:
    spool = Spool(tmp_path, fsync=False)
    spool.prepare()
    envelope = make_envelope()
    reception = spool.receive(envelope)
    line = b"z" * 998 + b"\r\n"
    dotted = b"." + b"d" * 997 + b"\r\n"
    block = (line * 63 + dotted) * 4  # 256,000 bytes, a dot line every 64
    head = b"Subject: big\r\n\r\n"
    reception.write(head)
    for _ in range(25 * 1024 * 1024 // len(block) + 1):
        reception.write(block)
    await reception.commit()
    msg = spool.load(envelope.queue_id, Queue.INCOMING, preload=1 << 18)
    assert msg.preloaded is None and msg.content_length > 25 * 1024 * 1024

    deliverer = UpstreamDeliverer(helo_name="relayd.test", credentials=AccountCredentials())
    tracemalloc.start()
    try:
        report, session = await deliverer.attempt(
            _account(raw_sink.port),
            envelope.sender,
            envelope.recipients,
            msg,
            None,
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r.verdict for r in report.results] == [Verdict.DELIVERED]
    if session is not None:
        await session.quit()
    # Blocks of the file, never the message: a small fraction of its 25 MiB.
    assert peak < 4 * 1024 * 1024, peak
    content = msg.read_content()
    [(wire, unstuffed)] = raw_sink.digests
    assert wire == hashlib.sha256(wire_form(content)).hexdigest()
    assert unstuffed == hashlib.sha256(as_delivered(content)).hexdigest()
    assert as_delivered(content) is content


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "one-by-one"])
async def test_refused_recipients_and_a_transaction_with_none_left(
    raw_sink: RawSink, pipelining: bool
) -> None:
    raw_sink.pipelining = pipelining
    raw_sink.refused = (b"<gone@y.test>",)
    session = SmtpSession(
        _account(raw_sink.port),
        helo_name="relayd.test",
        credentials=AccountCredentials(),
    )
    await session.open()
    content = BytesContent(b"Subject: s\r\n\r\nb\r\n")
    result = await session.send("a@x.test", ("ok@y.test", "gone@y.test"), content)
    assert {r: (phase.value, reply.code) for r, (phase, reply) in result.replies.items()} == {
        "ok@y.test": ("data", 250),
        "gone@y.test": ("rcpt", 550),
    }
    result = await session.send("a@x.test", ("gone@y.test",), content)
    assert [(p.value, r.code) for p, r in result.replies.values()] == [("rcpt", 550)]
    assert session.is_open  # still in step: RSET went through, no content was sent
    result = await session.send("a@x.test", ("ok@y.test",), content)
    assert result.replies["ok@y.test"][1].code == 250
    await session.quit()
    assert len(raw_sink.sections) == 2
    verbs = [c.split(b" ")[0].split(b":")[0] for c in raw_sink.commands]
    # Without PIPELINING, DATA is not even sent when no recipient was accepted.
    assert verbs.count(b"DATA") == (3 if pipelining else 2)
