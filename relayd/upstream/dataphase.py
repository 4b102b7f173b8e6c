"""The DATA phase of an upstream transaction, streamed from the spool file.

aiosmtplib's ``data()`` takes the whole message as bytes, copies it twice (line endings,
dot-stuffing) and writes it at once: a 25 MiB message cost about three times its size in
memory. Here the content is read from the spool in blocks, each block
made transparent (RFC 5321 §4.5.2) and written with flow control, so memory stays at a few
blocks whatever the size.

What goes on the wire is, after the receiver removes the transparency dots, exactly
``relayd.core.lines.as_delivered(content)``: every line ending CRLF and a CRLF at the end.
The spool holds content in that form already (``relayd.inbound.data`` normalises line
endings), so for mail received over SMTP it is the spooled bytes themselves; the Sent copy
files ``as_delivered(content)`` so that it is the delivered message in every case.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from relayd.core.lines import to_crlf
from relayd.core.outcome import Reply
from relayd.upstream.channel import ReplyChannel

__all__ = [
    "BLOCK",
    "BytesContent",
    "ContentSource",
    "DotStuffer",
    "send_content",
]

# Blocks read from the spool file and written to the connection.
BLOCK = 1 << 18


class ContentSource(Protocol):
    """Message content that can be read in blocks (a spooled message, or bytes)."""

    @property
    def content_length(self) -> int: ...

    def iter_content(self, chunk_size: int = ...) -> Iterator[bytes]: ...


class BytesContent:
    """Content already in memory (a test message, a DSN) as a ``ContentSource``."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    @property
    def content_length(self) -> int:
        return len(self.data)

    def iter_content(self, chunk_size: int = BLOCK) -> Iterator[bytes]:
        for start in range(0, len(self.data), chunk_size):
            yield self.data[start : start + chunk_size]


class DotStuffer:
    """Content blocks in, the DATA section out (pure; no I/O).

    Lines end in CRLF, a line starting with "." gets a second one, and ``end()`` closes the
    section with ``.<CR><LF>`` after a final CRLF. State crosses block boundaries: a CR at
    the end of one block may be the first half of a CRLF, and a dot at the start of a block
    starts a line when the previous block ended one.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._pending_cr = False
        self._empty = True

    def feed(self, block: bytes) -> bytes:
        if not block:
            return b""
        self._empty = False
        if self._pending_cr:
            block = b"\r" + block
        self._pending_cr = block.endswith(b"\r")
        if self._pending_cr:
            block = block[:-1]
            if not block:
                return b""
        block = to_crlf(block)
        out = block.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out
        self._at_line_start = block.endswith(b"\n")
        return out

    def end(self) -> bytes:
        if self._pending_cr:  # a bare CR at the very end: a line ending of its own
            self._pending_cr = False
            return b"\r\n.\r\n"
        if self._empty or self._at_line_start:
            return b".\r\n"
        return b"\r\n.\r\n"


async def send_content(channel: ReplyChannel, content: ContentSource) -> Reply:
    """After ``354``: the content, the final dot, and the server's reply to the message.
    The caller bounds the time it takes.

    Raises what the channel raises when the connection breaks, and the spool's OSError when
    the file cannot be read: the connection must then be dropped, never ended with the
    final dot (the server would take a cut message).
    """
    stuffer = DotStuffer()
    held = b""  # the last block goes out with the final dot: one write for a small message
    for block in content.iter_content(BLOCK):
        out = stuffer.feed(block)
        if not out:
            continue
        if held:
            channel.write(held)
            # The transport's buffer is bounded: wait while the peer is slower than the disk.
            await channel.drain()
        held = out
    channel.write(held + stuffer.end())
    return await channel.reply()
