"""DATA from an SMTP client to the spool: read in large blocks, decoded, and spooled as it
arrives (``relayd.inbound.data`` decodes, ``relayd.inbound.submission`` spools).

Only ``<CR><LF>.<CR><LF>`` ends DATA (SMTP smuggling, CVE-2023-51764 / CVE-2024-27305), and
the reply comes only after it, whatever went wrong before (RFC 5321 §4.2.5): a refusal is
remembered while the rest of the section is read and dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from relayd.inbound.data import HEADER_TOO_LARGE_REPLY, DataDecoder, HeaderSection
from relayd.inbound.submission import INTERNAL_REPLY, STORAGE_REPLY, MessageSink

__all__ = ["DATA_READ_LIMIT", "MessageStream", "read_data_section"]

log = logging.getLogger("relayd.inbound")

# A DATA read takes up to this much at once when no line boundary is near (the reader's
# limit is aiosmtpd's 1001-byte line length for commands).
DATA_READ_LIMIT = 1 << 18
# Decoded content goes to the spool in blocks of about this size.
_BATCH = 1 << 16
_DOT_CRLF = b".\r\n"


async def read_data_section(
    reader: asyncio.StreamReader,
    feed: Callable[[bytes], None],
    progress: Callable[[], None] = lambda: None,
    read_limit: int = DATA_READ_LIMIT,
) -> None:
    """Read up to and including the end of DATA, passing everything before it to ``feed``.

    The end is the first ``.<CR><LF>`` whose dot starts a line, i.e. follows a CRLF:
    ``\\r\\n.\\r\\n`` and nothing else (``\\n.\\n``, ``\\r.\\r\\n`` and the like are content).
    Reading up to each ``.<CR><LF>``, rather than up to ``<CR><LF>.<CR><LF>``, lets the CRLF
    that ended the DATA command count for the first line: an empty message (``.<CR><LF>``
    right after 354) ends where it should, and no pipelined command after it is swallowed.
    ``before`` holds the two bytes that preceded each read. The bytes after the end stay in
    the reader for the command loop (PIPELINING, RFC 2920).
    """
    saved_limit = reader._limit  # type: ignore[attr-defined]
    reader._limit = read_limit  # type: ignore[attr-defined]
    before = b"\r\n"  # the end of the DATA command line
    try:
        while True:
            try:
                chunk = await reader.readuntil(_DOT_CRLF)
            except asyncio.LimitOverrunError as exc:
                # No ".\r\n" within the limit: take what cannot hold the start of one
                # (readuntil leaves the last two bytes in the buffer).
                chunk = await reader.readexactly(exc.consumed)
                feed(chunk)
                before = (before + chunk)[-2:]
                progress()
                continue
            progress()
            content = chunk[:-3]
            if (before + content)[-2:] == b"\r\n":
                feed(content)
                return
            feed(chunk)
            before = chunk[-2:]
    finally:
        reader._limit = saved_limit  # type: ignore[attr-defined]


class MessageStream:
    """One message on its way from the DATA stream to the spool.

    Errors of the spool or the policy are remembered, not raised: the server must read on to
    the end of DATA before it may reply, or the rest of the message would be taken as
    commands (RFC 5321 §4.2.5, and the smuggling the terminator rule is there to stop).
    """

    def __init__(self, sink: MessageSink) -> None:
        self.sink = sink
        self.decoder = DataDecoder(sink.max_size, sink.size_reply)
        self.headers = HeaderSection()
        self.reply: str | None = None  # the refusal, once there is one
        self._started = False  # the header section passed and the spool file is open
        self._batch: list[bytes] = []
        self._batched = 0

    def feed(self, raw: bytes) -> None:
        if self.reply is not None:
            return
        self._batch.append(raw)
        self._batched += len(raw)
        if self._batched >= _BATCH:
            self._store(self.decoder.feed(self._take_batch()), final=False)

    async def finish(self) -> str:
        if self.reply is None:
            content = self.decoder.feed(self._take_batch())
            self._store(content + self.decoder.end(), final=True)
        if self.reply is not None:
            return self.reply
        try:
            # Not shielded, and need not be: a client hanging up while the fsync runs
            # cancels this wait, not the commit (``Reception.submit``). The message then
            # stays queued without its 250, and may come twice if the client retries.
            await self.sink.commit()
        except OSError as exc:  # SpoolError included: nothing was acknowledged
            log.error("%s: spool commit failed: %s", self.sink.envelope.peer, exc)
            return STORAGE_REPLY
        except Exception:
            log.exception("%s: spool commit failed", self.sink.envelope.peer)
            return INTERNAL_REPLY
        return f"250 2.0.0 queued as {self.sink.envelope.queue_id}"

    def _take_batch(self) -> bytes:
        raw = b"".join(self._batch)
        self._batch.clear()
        self._batched = 0
        return raw

    def _store(self, content: bytes, *, final: bool) -> None:
        if self.reply is not None:
            return
        if self.decoder.refusal is not None:
            self._refuse(self.decoder.refusal)
            return
        try:
            if self._started:
                if content:
                    self.sink.write(content)
                return
            split = self.headers.feed(content)
            if split is None and final:
                split = self.headers.finish()
            if split is None:
                if self.headers.too_large:
                    self._refuse(HEADER_TOO_LARGE_REPLY)
                return
            refusal = self.sink.start(*split)
            if refusal is not None:
                self._refuse(refusal)
                return
            self._started = True
        except OSError as exc:  # disk full, or any SpoolError: 452, never a partial file
            log.error("%s: cannot spool message: %s", self.sink.envelope.peer, exc)
            self._refuse(STORAGE_REPLY)
        except Exception:
            log.exception("%s: error while receiving a message", self.sink.envelope.peer)
            self._refuse(INTERNAL_REPLY)

    def _refuse(self, reply: str) -> None:
        self.reply = reply
        self._batch.clear()
        self.sink.abort()
