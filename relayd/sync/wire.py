"""IMAP wire syntax relayd needs, as pure functions (no sockets): tested from tables.

- quoted strings (RFC 3501 §4.3) and mailbox arguments (quoted, modified UTF-7 §5.1.3):
  aioimaplib passes mailbox names as given, and an unquoted "Sent Messages" gets NO;
- LIST responses with their attributes, for the RFC 6154 ``\\Sent`` special-use folder;
- SEARCH responses; the SASL initial responses of PLAIN (RFC 4616) and XOAUTH2;
- the Message-ID a copy is found by, and the INTERNALDATE of an APPEND.
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass

from relayd.core.msgid import message_id_from
from relayd.sync import mutf7

__all__ = [
    "ListEntry",
    "find_special_use",
    "internal_date",
    "mailbox_argument",
    "message_id",
    "parse_list",
    "parse_search",
    "plain_response",
    "quote",
    "response_code",
    "xoauth2_response",
]

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_LITERAL = re.compile(rb"\{(\d+)\+?\}$")
_CODE = re.compile(rb"^\s*\[([A-Za-z0-9.-]+)")


def quote(text: str) -> str:
    """A quoted string (RFC 3501 §4.3 / §9 ``quoted``): backslash and DQUOTE escaped.

    CR, LF and NUL cannot be sent in a quoted string, and 8-bit text is not allowed in one
    (encode mailbox names first; use a SASL mechanism for non-ASCII credentials).
    """
    if any(c in text for c in "\r\n\0"):
        raise ValueError("CR, LF and NUL cannot be sent in an IMAP quoted string")
    if not text.isascii():
        raise ValueError("an IMAP quoted string holds US-ASCII only")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def mailbox_argument(name: str) -> str:
    """A configured folder name ("Éléments envoyés") as an IMAP argument."""
    return quote(mutf7.encode(name))


@dataclass(frozen=True)
class ListEntry:
    """One ``* LIST`` response: the name as the server sent it (modified UTF-7)."""

    name: str
    attributes: frozenset[str]  # lower-cased, e.g. {"\\hasnochildren", "\\sent"}
    delimiter: str | None

    @property
    def display_name(self) -> str:
        try:
            return mutf7.decode(self.name)
        except ValueError:
            return self.name

    @property
    def argument(self) -> str:
        return quote(self.name)


class _Reader:
    """Tokens of one LIST response: (attributes) delimiter name [extended data]."""

    def __init__(self, line: bytes, literals: list[bytes]) -> None:
        self.text = line
        self.pos = 0
        self.literals = literals

    def _skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] == 0x20:
            self.pos += 1

    def attributes(self) -> frozenset[str]:
        self._skip_space()
        if not self.text.startswith(b"(", self.pos):
            raise ValueError("expected an attribute list")
        end = self.text.find(b")", self.pos)
        if end < 0:
            raise ValueError("unterminated attribute list")
        inner = self.text[self.pos + 1 : end].decode("ascii", "replace")
        self.pos = end + 1
        return frozenset(a.lower() for a in inner.split())

    def string(self) -> str | None:
        """A quoted string, a literal, an atom, or NIL (None)."""
        self._skip_space()
        if self.pos >= len(self.text):
            if self.literals:  # the name came as a literal {n} at the end of the line
                return self.literals.pop(0).decode("utf-8", "replace")
            raise ValueError("missing mailbox name")
        if self.text[self.pos] == 0x22:  # DQUOTE
            out = bytearray()
            i = self.pos + 1
            while i < len(self.text):
                c = self.text[i]
                if c == 0x5C and i + 1 < len(self.text):  # backslash escapes the next char
                    out.append(self.text[i + 1])
                    i += 2
                    continue
                if c == 0x22:
                    self.pos = i + 1
                    return out.decode("utf-8", "replace")
                out.append(c)
                i += 1
            raise ValueError("unterminated quoted string")
        literal = _LITERAL.match(self.text, self.pos)
        if literal is not None:
            self.pos = len(self.text)
            if not self.literals:
                raise ValueError("literal announced but not received")
            return self.literals.pop(0).decode("utf-8", "replace")
        end = self.text.find(b" ", self.pos)
        end = len(self.text) if end < 0 else end
        atom = self.text[self.pos : end].decode("utf-8", "replace")
        self.pos = end
        return None if atom.upper() == "NIL" else atom


def parse_list(lines: list[bytes | bytearray]) -> list[ListEntry]:
    """LIST responses as aioimaplib collects them.

    Each response is one line without its ``* LIST`` prefix, e.g.
    ``(\\HasNoChildren \\Sent) "." "Sent Items"``; a name sent as a literal ``{n}`` follows
    in the next element. The tagged completion text is in the list too and is skipped.
    """
    entries: list[ListEntry] = []
    i = 0
    while i < len(lines):
        line = bytes(lines[i])
        i += 1
        if not line.startswith(b"("):
            continue
        literals: list[bytes] = []
        if _LITERAL.search(line) and i < len(lines):
            literals.append(bytes(lines[i]))
            i += 1
        reader = _Reader(line, literals)
        try:
            attributes = reader.attributes()
            delimiter = reader.string()
            name = reader.string()
        except ValueError:
            continue
        if name is not None:
            entries.append(ListEntry(name, attributes, delimiter))
    return entries


def find_special_use(entries: list[ListEntry], attribute: str) -> ListEntry | None:
    """The mailbox flagged ``attribute`` (RFC 6154 §2, e.g. ``\\Sent``), if any.

    A mailbox flagged ``\\NonExistent`` or ``\\Noselect`` cannot take an APPEND.
    """
    wanted = attribute.lower()
    for entry in entries:
        if wanted in entry.attributes and not entry.attributes & {"\\noselect", "\\nonexistent"}:
            return entry
    return None


def parse_search(lines: list[bytes | bytearray]) -> list[int]:
    """Message numbers of ``* SEARCH n n ...`` responses (RFC 3501 §7.2.5)."""
    found: list[int] = []
    for raw in lines:
        line = bytes(raw).strip()
        if line.upper().startswith(b"SEARCH"):
            line = line[6:].strip()
        if line and all(part.isdigit() for part in line.split()):
            found.extend(int(part) for part in line.split())
    return found


def response_code(text: bytes | bytearray | str) -> str | None:
    """The response code of a status response, e.g. ``AUTHENTICATIONFAILED`` (RFC 5530)."""
    raw = text.encode() if isinstance(text, str) else bytes(text)
    match = _CODE.match(raw)
    return match.group(1).decode("ascii").upper() if match else None


def plain_response(username: str, password: str) -> bytes:
    """SASL PLAIN (RFC 4616): UTF-8, so it carries credentials LOGIN's quoted strings cannot."""
    return base64.b64encode(b"\0" + username.encode() + b"\0" + password.encode())


def xoauth2_response(username: str, token: str) -> bytes:
    """The XOAUTH2 client response: base64 of ``user=U^Aauth=Bearer T^A^A``
    (the format Google and Microsoft publish)."""
    return base64.b64encode(f"user={username}\x01auth=Bearer {token}\x01\x01".encode())


def message_id(content: bytes) -> str | None:
    """The Message-ID of a message (``<local@domain>``), from its header section (for files
    spooled before the envelope carried it)."""
    end = content.find(b"\r\n\r\n")
    head = content if end < 0 else content[: end + 2]
    # Unfold (RFC 5322 §2.2.3) before looking: a long Message-ID may sit on the next line.
    head = re.sub(rb"\r?\n[ \t]+", b" ", head)
    for line in head.split(b"\n"):
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"message-id":
            return message_id_from(value.decode("utf-8", "replace"))
    return None


def internal_date(when: float) -> str:
    """An APPEND date-time (RFC 3501 §9 ``date-time``), quoted, in UTC.

    Month names are written out here, not with strftime("%b"), which follows the locale.
    """
    t = time.gmtime(when)
    return (
        f'"{t.tm_mday:02d}-{_MONTHS[t.tm_mon - 1]}-{t.tm_year:04d} '
        f'{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"'
    )
