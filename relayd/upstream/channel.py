"""The transaction phase of an upstream connection: commands out, replies in, pipelined.

aiosmtplib opens the connection, secures it and logs in (``relayd.upstream.transport``);
then ``ReplyChannel`` takes the transport over for the transactions, because aiosmtplib
cannot pipeline (RFC 2920): it expects one reply per command it wrote and drops what comes
on top. With PIPELINING, MAIL FROM, every RCPT TO and DATA go out in
one write and their replies are read in order: one round trip instead of two plus one per
recipient, and a fraction of the system calls on both ends.
"""

from __future__ import annotations

import asyncio
import collections
from typing import cast

import aiosmtplib

from relayd.core.outcome import Reply

__all__ = ["ReplyChannel", "parse_replies"]

# A reply longer than this (RFC 5321 §4.5.3.1.5 caps a line at 512 octets) is an error.
MAX_REPLY = 1 << 16


def parse_replies(buffer: bytearray) -> list[Reply]:
    """Take every complete reply off the front of ``buffer`` (multi-line replies joined).

    Raises aiosmtplib.SMTPException for a line that is not ``ddd[ -]text``.
    """
    replies: list[Reply] = []
    start = 0
    texts: list[str] = []
    while True:
        end = buffer.find(b"\n", start)
        if end < 0:
            break
        line = bytes(buffer[start:end]).rstrip(b"\r")
        if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
            raise aiosmtplib.SMTPException(f"malformed reply line {line[:80]!r}")
        texts.append(line[4:].strip(b" \t").decode("utf-8", "surrogateescape"))
        start = end + 1
        if line[3:4] != b"-":
            replies.append(Reply(int(line[:3]), " ".join(texts)))
            texts = []
            del buffer[:start]
            start = 0
    if len(buffer) > MAX_REPLY:
        raise aiosmtplib.SMTPException("reply too long")
    return replies


class ReplyChannel(asyncio.Protocol):
    """The protocol of an upstream connection once it is logged in.

    ``write`` queues bytes, ``drain`` waits while the transport's buffer is full (so a big
    message goes out at the pace of the connection, never whole in memory), ``reply``
    returns the next reply in order. A closed or broken connection raises
    ``aiosmtplib.SMTPServerDisconnected`` (a ConnectionError), a bad reply
    ``aiosmtplib.SMTPException``.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self._buffer = bytearray()
        self._replies: collections.deque[Reply] = collections.deque()
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._drained: asyncio.Future[None] | None = None

    @classmethod
    def take_over(cls, smtp: aiosmtplib.SMTP) -> ReplyChannel:
        """Take ``smtp``'s connection (logged in, between transactions); the aiosmtplib
        object must not speak on it again."""
        transport = smtp.transport
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("connection lost")
        channel = cls(cast(asyncio.Transport, transport))
        channel.transport.set_protocol(channel)
        return channel

    @property
    def is_open(self) -> bool:
        return self._error is None and not self.transport.is_closing()

    # -- asyncio.Protocol ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            self._replies.extend(parse_replies(self._buffer))
        except aiosmtplib.SMTPException as exc:
            self._fail(exc)
            self.transport.abort()
            return
        if self._replies:
            self._wake()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("server closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        error = aiosmtplib.SMTPServerDisconnected("connection lost")
        if exc is not None:
            error.__cause__ = exc
        self._fail(error)
        self.resume_writing()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    # -- for the transaction ------------------------------------------------------------

    def begin(self) -> None:
        """Before a transaction: a reply nobody asked for (a 421 sent to an idle session,
        say) means the session is over; it must not be taken for the next command's."""
        if self._replies:
            first = self._replies[0]
            self._fail(aiosmtplib.SMTPServerDisconnected(f"unsolicited reply: {first}"))
            self.transport.close()
        if self._error is not None:
            raise self._error

    def write(self, data: bytes) -> None:
        if self._error is not None:
            raise self._error
        self.transport.write(data)

    async def drain(self) -> None:
        if self._error is not None:
            raise self._error
        if self._paused:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
            if self._error is not None:
                raise self._error

    async def reply(self) -> Reply:
        """The next reply; the caller bounds the wait (asyncio.timeout)."""
        while not self._replies:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._replies.popleft()

    def close(self) -> None:
        self._fail(aiosmtplib.SMTPServerDisconnected("connection closed"))
        self.transport.close()

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
