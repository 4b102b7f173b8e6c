"""The format of a spool message file, in one place: written by receptions (SMTP, maildrop,
DSNs, alerts), read by the attempt and by recovery, and written by the benchmark's spool.

A file is::

    RELAYD1 <n>CRLF <envelope: n bytes of JSON> CRLF <content> CRLF RELAYD-END <16 hex> CRLF

The trailer records the content length, so a file cut short by a crash is recognised and
quarantined rather than sent (Postfix discards queue files without their end record the
same way). A file sealed with ``spool.key`` (``relayd.spool.sealing``) starts ``RELAYD1S``;
its header is the salt and the sealed envelope, its content sealed segments, and its
trailer counts the content as stored.

The file's mode says whether it is a message yet: 0600 is a complete message; 0200 (written
by its owner, read by nobody) is a file reserved in ``incoming/`` for a reception that has
not finished (``relayd.spool.reserved``), which nothing may read, move or count. Postfix
marks its complete queue files the same way, with a mode bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from relayd.core.envelope import Envelope
from relayd.errors import SpoolError

__all__ = [
    "COMPLETE_MODE",
    "HEAD_READ",
    "MAGIC",
    "RESERVED_MODE",
    "SEALED_MAGIC",
    "TRAILER_LEN",
    "Head",
    "encode_plain",
    "head",
    "is_complete",
    "parse_head",
    "trailer",
]

MAGIC = b"RELAYD1 "
SEALED_MAGIC = b"RELAYD1S "
TRAILER_PREFIX = b"\r\nRELAYD-END "
TRAILER_LEN = len(TRAILER_PREFIX) + 16 + 2  # 16 hex digits of content length + CRLF
# The first read of a message file: enough for the envelope of nearly every message.
HEAD_READ = 1 << 13
# The first line is short: the magic and a decimal length.
_FIRST_LINE_MAX = 64
# A message file's mode once it is complete, and while it is reserved for a reception.
COMPLETE_MODE = 0o600
RESERVED_MODE = 0o200


def is_complete(mode: int) -> bool:
    """Whether a file of this ``st_mode`` is a complete message (and not a reserved one)."""
    return bool(mode & 0o400)


def head(header: bytes, *, sealed: bool = False) -> bytes:
    """The first line and the header block (the envelope JSON, or salt + sealed envelope)."""
    magic = SEALED_MAGIC if sealed else MAGIC
    return magic + str(len(header)).encode() + b"\r\n" + header + b"\r\n"


def trailer(length: int) -> bytes:
    return TRAILER_PREFIX + f"{length:016X}".encode() + b"\r\n"


@dataclass(frozen=True)
class Head:
    """Where the parts of a file are, from its first bytes."""

    sealed: bool
    header_start: int
    content_offset: int  # where the content starts; the header block ends 2 bytes before

    def header(self, data: bytes) -> bytes:
        return data[self.header_start : self.content_offset - 2]

    def complete_in(self, data: bytes) -> bool:
        """Whether ``data`` holds the whole header block and its CRLF."""
        end = self.content_offset
        return len(data) >= end and data[end - 2 : end] == b"\r\n"


def parse_head(data: bytes) -> Head:
    """The layout announced by the first line of ``data``; SpoolError if it is not one."""
    end = data.find(b"\r\n", 0, _FIRST_LINE_MAX)
    sealed = data.startswith(SEALED_MAGIC)
    magic = SEALED_MAGIC if sealed else MAGIC
    if end < 0 or not data.startswith(magic):
        raise SpoolError("bad header line")
    digits = data[len(magic) : end]
    if not digits.isdigit():
        raise SpoolError("bad header line")
    header_start = end + 2
    return Head(sealed, header_start, header_start + int(digits) + 2)


def encode_plain(envelope: Envelope, content: bytes) -> bytes:
    """A whole unsealed message file, as a reception writes it."""
    return head(envelope.to_json()) + content + trailer(len(content))
