"""Header policy for submitted messages (SPEC "Routing", rule 5): pure code, no I/O.

A message must name, in ``From:`` and (if present) ``Sender:``, exactly one mailbox that the
route may send as; otherwise it is refused with ``550 5.7.1`` before anything is spooled, so
an application allowed to send as A cannot put B in the header its recipients see. Missing
``From:``, ``Message-ID:`` and ``Date:`` fields are added, as Postfix's cleanup does for
local submissions (RFC 5322 §3.6 requires From and Date; §3.6.4 recommends Message-ID).

The header bytes are relayed as they were received: fields are parsed (and unfolded) only to
be read. Python's email package never re-serialises the message (CVE-2024-6923, header
injection through re-folding); the only fields relayd writes are the ones it adds or the one
``From:``/``Sender:`` it rewrites for ``rewrite_senders``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.errors import InvalidHeaderDefect
from email.header import Header
from email.headerregistry import AddressHeader, HeaderRegistry
from email.utils import format_datetime, getaddresses
from typing import cast

from relayd.core.msgid import message_id_from
from relayd.core.routing import Refusal

__all__ = [
    "MAX_ORIGINATOR_LENGTH",
    "CheckedHeader",
    "HeaderField",
    "HeaderPolicy",
    "apply_header_policy",
    "new_message_id",
    "parse_fields",
    "parse_mailbox",
    "single_mailbox",
]

_REGISTRY = HeaderRegistry()
# One mailbox never needs more (RFC 5321 §4.5.3.1: 64 + 255 octets of address, plus a name);
# the email package's parser takes time quadratic in the length of some values (a 200 kB
# "From: , , , ..." costs over a minute), and it runs on the event loop.
MAX_ORIGINATOR_LENGTH = 2048
# The one defect accepted in an originator field: cron and other local tools write a bare
# local part ("root"), which only passes if rewrite_senders maps it to the sender.
_NO_DOMAIN_DEFECT = "addr-spec local part with no domain"
# RFC 5322 §3.2.3 atext, and a mailbox built from nothing but atoms and one quoted string.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR_SPEC = rf"{_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*"
_SIMPLE_MAILBOX = re.compile(
    rf"(?:(?:(?P<atoms>{_ATOM}(?:[ \t]+{_ATOM})*)|\"(?P<quoted>[^\"\\]*)\")[ \t]*)?"
    rf"<(?P<angle>{_ADDR_SPEC})>|(?P<bare>{_ADDR_SPEC})"
)


@dataclass(frozen=True)
class HeaderPolicy:
    """What the route allows; built by the handler from the transaction and the config."""

    sender: str  # the envelope sender, after rewrite_senders
    allowed: frozenset[str]  # lower-cased addresses From:/Sender: may name
    from_name: str | None  # the account's from_name, for an added From:
    helo_name: str  # the domain of added Message-IDs
    # rewrite_senders, when it changed the envelope sender: a From:/Sender: naming an address
    # that rewrites to the sender is rewritten too (SPEC routing rule 2).
    rewrite: Callable[[str], str] | None = None


@dataclass(frozen=True)
class CheckedHeader:
    """A header section that passed the policy: the bytes to spool and its Message-ID."""

    head: bytes
    message_id: str | None


@dataclass(frozen=True)
class HeaderField:
    name: str  # lower-cased
    raw: bytes  # the field as received, every line with its CRLF

    def value(self) -> str:
        """The unfolded value (RFC 5322 §2.2.3), for reading only."""
        _, _, value = self.raw.partition(b":")
        unfolded = value.replace(b"\r\n", b"")
        # 8-bit header bytes (RFC 6532) survive as surrogates and never equal an address.
        return unfolded.decode("utf-8", "surrogateescape").strip(" \t")


def parse_fields(head: bytes) -> list[HeaderField]:
    """Split a header section (as cut by ``data.HeaderSection``) into fields."""
    fields: list[HeaderField] = []
    lines = head.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for line in lines:
        if line[:1] in (b" ", b"\t") and fields:
            last = fields[-1]
            fields[-1] = HeaderField(last.name, last.raw + line + b"\r\n")
            continue
        name = line.partition(b":")[0].rstrip(b" \t").decode("ascii", "replace").lower()
        fields.append(HeaderField(name, line + b"\r\n"))
    return fields


def single_mailbox(value: str) -> tuple[str, str] | str:
    """``(display name, address)`` if ``value`` names exactly one mailbox, else the reason.

    Parsed with the email package's RFC 5322 parser, which decodes encoded-words and knows
    quoted strings, comments and groups: ``"Doe, John" <j@x>`` and ``=?utf-8?q?Doe,_John?=
    <j@x>`` are one mailbox, ``a@x, b@y`` are two, ``undisclosed:;`` is a group of none.
    Anything the parser had to guess at (trailing text, several addresses run together) is
    refused rather than interpreted: a recipient's mail client might guess differently.
    """
    if len(value) > MAX_ORIGINATOR_LENGTH:
        return "is too long"
    simple = _SIMPLE_MAILBOX.fullmatch(value)
    if simple is not None and "=?" not in value:
        # What nearly every application writes; the full parser gives the same answer
        # for these forms at a small fraction of the cost.
        name = simple["atoms"] or simple["quoted"] or ""
        return " ".join(name.split()), simple["angle"] or simple["bare"]
    return parse_mailbox(value)


def parse_mailbox(value: str) -> tuple[str, str] | str:
    """``single_mailbox`` through the email package's parser alone."""
    try:
        header = _REGISTRY("from", value)
        groups = cast(AddressHeader, header).groups
        defects = header.defects
    except Exception:  # the parser has raised IndexError and the like on malformed input
        return "cannot be parsed"
    if any(group.display_name is not None for group in groups):
        return "names a group, not a mailbox"
    mailboxes = [address for group in groups for address in group.addresses]
    if len(mailboxes) != 1:
        return f"names {len(mailboxes)} mailboxes, not one"
    for defect in defects:
        if isinstance(defect, InvalidHeaderDefect) and str(defect) != _NO_DOMAIN_DEFECT:
            return "is malformed"
    mailbox = mailboxes[0]
    if not mailbox.addr_spec or mailbox.addr_spec == "<>":
        return "names no address"
    return mailbox.display_name, mailbox.addr_spec


def _format_mailbox(display_name: str, address: str) -> str:
    # A name never brings its own line break into the header (no injected fields).
    display_name = " ".join(display_name.split())
    if not display_name:
        return address
    if display_name.isascii():
        quoted = display_name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{quoted}" <{address}>'
    # An RFC 2047 encoded-word is readable by every client, SMTPUTF8 or not; the address
    # itself may be UTF-8 (RFC 6532), which formataddr() would refuse.
    readable = display_name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    encoded = Header(readable, "utf-8").encode(linesep="\r\n")
    return f"{encoded} <{address}>"


def _comment_name(value: str) -> str:
    """``root (Cron Daemon)``: the comment is the only name such a field has."""
    pairs = getaddresses([value])
    return pairs[0][0] if len(pairs) == 1 else ""


def _check_originator(
    field: HeaderField, policy: HeaderPolicy, label: str
) -> HeaderField | Refusal:
    """The field as it is, or rewritten to the sender, or the refusal."""
    value = field.value()
    parsed = single_mailbox(value)
    if isinstance(parsed, str):
        return Refusal(f"550 5.7.1 {label}: header {parsed}")
    display_name, address = parsed
    if address.lower() in policy.allowed:
        return field
    if policy.rewrite is not None and policy.rewrite(address).lower() == policy.sender.lower():
        name_bytes = field.raw.partition(b":")[0].rstrip(b" \t")
        new_value = _format_mailbox(display_name or _comment_name(value), policy.sender)
        encoded = new_value.encode("utf-8", "surrogateescape")
        return HeaderField(field.name, name_bytes + b": " + encoded + b"\r\n")
    return Refusal(
        f"550 5.7.1 {label}: <{address}> is not the sender <{policy.sender}> "
        "or an address of its account"
    )


def apply_header_policy(
    head: bytes,
    policy: HeaderPolicy,
    *,
    now: datetime | None = None,
    message_id: str | None = None,
) -> CheckedHeader | Refusal:
    """The header section to spool (and the Message-ID it has), or the refusal to reply
    with. ``message_id``: the one to add when the message has none."""
    fields = parse_fields(head)
    by_name: dict[str, list[int]] = {}
    for index, field in enumerate(fields):
        by_name.setdefault(field.name, []).append(index)

    for name, label in (("from", "From"), ("sender", "Sender")):
        indexes = by_name.get(name, [])
        if len(indexes) > 1:
            return Refusal(f"550 5.7.1 Message has {len(indexes)} {label}: headers, not one")
        if indexes:
            checked = _check_originator(fields[indexes[0]], policy, label)
            if isinstance(checked, Refusal):
                return checked
            fields[indexes[0]] = checked

    added: list[str] = []
    if "from" not in by_name:
        added.append(f"From: {_format_mailbox(policy.from_name or '', policy.sender)}")
    if "date" not in by_name:
        added.append(f"Date: {format_datetime(now or datetime.now().astimezone())}")
    ids = by_name.get("message-id")
    if ids:
        found = message_id_from(fields[ids[0]].value())
    else:
        found = message_id or new_message_id(policy.helo_name)
        added.append(f"Message-ID: {found}")
    prefix = "".join(f"{line}\r\n" for line in added).encode("utf-8", "surrogateescape")
    return CheckedHeader(prefix + b"".join(field.raw for field in fields), found)


def new_message_id(domain: str) -> str:
    return f"<{secrets.token_hex(16)}@{domain}>"
