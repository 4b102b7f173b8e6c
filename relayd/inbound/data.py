"""Decoding the DATA section of an SMTP transaction: pure code, no I/O.

The server reads the section off the socket in blocks (see ``relayd.inbound.server``, which
alone decides where DATA ends: only at ``<CR><LF>.<CR><LF>``). ``DataDecoder`` turns those raw
blocks into the message content relayd stores, and ``HeaderSection`` holds back the header
section so that the header policy can look at it before a single byte is written to the spool.

Everything works on whole blocks with bytes operations (``count``, ``replace``, ``find``);
no Python code runs per line of a message body. That is where aiosmtpd's own DATA reader
spends most of its time.
"""

from __future__ import annotations

import re

from relayd.core.lines import to_crlf

__all__ = [
    "HEADER_TOO_LARGE_REPLY",
    "MAX_HEADER_SECTION",
    "NUL_REPLY",
    "SIZE_REPLY",
    "DataDecoder",
    "HeaderSection",
]

NUL_REPLY = "554 5.6.0 NUL characters are not allowed"
SIZE_REPLY = "552 5.3.4 Message size exceeds fixed maximum message size"
HEADER_TOO_LARGE_REPLY = "552 5.3.4 Header section too large"

# Far above any real header section (Postfix's header_size_limit is 100 KiB per header);
# the header section is the only part of a message relayd holds in memory.
MAX_HEADER_SECTION = 1 << 20


class DataDecoder:
    """Raw DATA bytes in, message content out.

    Feed it everything between the ``354`` reply and the final ``.<CR><LF>`` (the CRLF before
    that dot ends the last line and belongs to the content). It returns content with every
    line ending normalised to CRLF and the transparency dot removed from lines that start
    with one (RFC 5321 §4.5.2). Long lines are passed on as they are.

    ``refusal`` becomes the SMTP reply to give once a NUL byte was seen or the content grew
    past ``max_size``; from then on ``feed`` returns nothing, and the server reads on to the
    end of DATA before replying (RFC 5321 §4.2.5: the reply comes after the final dot).
    """

    def __init__(self, max_size: int, size_reply: str = SIZE_REPLY) -> None:
        self.max_size = max_size
        self.size_reply = size_reply
        self.size = 0
        self.refusal: str | None = None
        # The CRLF that ended the DATA command line precedes the first content line.
        self._at_line_start = True
        # A CR at the end of a block: a bare CR, or the first half of a CRLF split by the read.
        self._pending_cr = False

    def feed(self, raw: bytes) -> bytes:
        if self.refusal is not None or not raw:
            return b""
        if b"\x00" in raw:
            # RFC 5322 §2.3 forbids NUL; many MTAs and IMAP servers mishandle it.
            self.refusal = NUL_REPLY
            return b""
        if self._pending_cr:
            raw = b"\r" + raw
        self._pending_cr = raw.endswith(b"\r")
        if self._pending_cr:
            raw = raw[:-1]
            if not raw:
                return b""
        block = to_crlf(raw)
        # Once every line ends in CRLF, "a line starting with a dot" is a dot after CRLF.
        # replace() scans left to right without overlap, so "\r\n.\r\n." loses both dots.
        content = block.replace(b"\r\n.", b"\r\n")
        if self._at_line_start and content.startswith(b"."):
            content = content[1:]
        self._at_line_start = block.endswith(b"\n")
        return self._count(content)

    def end(self) -> bytes:
        """The content still held back, at the end of DATA."""
        if self.refusal is not None or not self._pending_cr:
            return b""
        self._pending_cr = False
        self._at_line_start = True
        return self._count(b"\r\n")

    def _count(self, content: bytes) -> bytes:
        self.size += len(content)
        if self.size > self.max_size:
            self.refusal = self.size_reply
            return b""
        return content


# A header field's first line: a field name of printable ASCII except ":" (RFC 5322 §3.6.8),
# then the colon; white space before the colon is obsolete syntax that is still seen (§4.5).
_FIELD_START = re.compile(rb"[!-9;-~]+[ \t]*:")
# What an unfinished first line of a field can look like before its colon has arrived.
_FIELD_PREFIX = re.compile(rb"[!-9;-~]*[ \t]*|\r")


class HeaderSection:
    """Collects the header section from decoded content.

    The header section ends at the first empty line, or at the first line that is neither a
    header field nor its continuation: such a message has no separator line and that line
    starts its body (the body then gets an empty line in front, as Postfix's cleanup does).

    ``feed`` returns ``(head, rest)`` once, when the end is known: ``head`` is the header
    lines, ``rest`` what followed (the empty line, or the first body line, and what came with
    it in the same block). ``too_large`` is set instead when the header section outgrows
    ``limit``.
    """

    def __init__(self, limit: int = MAX_HEADER_SECTION) -> None:
        self.limit = limit
        self.too_large = False
        self._buffer = bytearray()
        self._scanned = 0  # start of the first line not yet classified

    def feed(self, content: bytes) -> tuple[bytes, bytes] | None:
        if self.too_large:
            return None
        self._buffer += content
        end = self._find_end(final=False)
        if end is None:
            if len(self._buffer) > self.limit:
                self._give_up()
            return None
        return self._split(end)

    def finish(self) -> tuple[bytes, bytes] | None:
        """At the end of DATA: a message without a body is all header section."""
        if self.too_large:
            return None
        end = self._find_end(final=True)
        return self._split(len(self._buffer) if end is None else end)

    def _split(self, end: int) -> tuple[bytes, bytes] | None:
        if end > self.limit:
            self._give_up()
            return None
        head, rest = bytes(self._buffer[:end]), bytes(self._buffer[end:])
        self._buffer = bytearray()
        return head, rest

    def _give_up(self) -> None:
        self.too_large = True
        self._buffer = bytearray()

    def _find_end(self, *, final: bool) -> int | None:
        buffer = self._buffer
        pos = self._scanned
        while pos < len(buffer):
            newline = buffer.find(b"\n", pos)
            complete = newline >= 0 or final
            if buffer.startswith(b"\r\n", pos):
                return pos  # the empty line
            if buffer[pos] in b" \t":
                if pos == 0:
                    return 0  # a continuation of nothing: not a header section at all
            elif _FIELD_START.match(buffer, pos) is None and (
                # An unfinished line that already cannot become a field starts the body:
                # deciding now keeps a long first body line out of the header buffer.
                complete or _FIELD_PREFIX.fullmatch(buffer, pos) is None
            ):
                return pos
            if newline < 0:
                break
            pos = newline + 1
        self._scanned = pos
        return None
