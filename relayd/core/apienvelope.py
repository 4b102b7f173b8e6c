"""The SMTP envelope kept authoritative over APIs that have none (SPEC "Transports").

Graph ``sendMail`` and Gmail ``messages.send`` take a MIME message and deliver it to the
addresses in its ``To:``, ``Cc:`` and ``Bcc:`` fields; there is no ``RCPT TO``. Yet relayd
promised the application SMTP semantics: every envelope recipient receives the message and
nobody else does. So before a message goes to such an API:

- **envelope recipients missing from the header fields** (Bcc-style recipients, a mailing
  list expanded by the application, ``sendmail -t`` having removed ``Bcc:``) are added in a
  new ``Bcc:`` field at the top of the header. The provider removes ``Bcc:`` before it
  delivers (RFC 5322 §3.6.3 "Bcc"), so recipients see the message exactly as submitted;
  the copy in the sender's Sent folder shows the ``Bcc:``, as a mail client's would.
- **header recipients that are not in the envelope** (a mail merge that sends one envelope
  per person under a shared ``To:``; an application that lists addresses it does not send
  to) would receive the message through the API. They are taken out of the ``To:``/``Cc:``
  /``Bcc:`` fields for this request; a field left empty is replaced by the RFC 5322 empty
  group ``undisclosed-recipients:;``. Only this case changes the message the recipients
  see: they do not see the removed addresses.

Messages whose header recipients are exactly the envelope go out byte for byte as spooled.
Pure functions of bytes; no I/O.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass

__all__ = ["Reconciled", "reconcile"]

_RECIPIENT_FIELDS = (b"to", b"cc", b"bcc")
_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")


@dataclass(frozen=True)
class Reconciled:
    content: bytes  # what goes to the API
    added_bcc: tuple[str, ...]  # envelope recipients that were only in the envelope
    removed: tuple[str, ...]  # header recipients outside this request's envelope

    @property
    def unchanged(self) -> bool:
        return not self.added_bcc and not self.removed


def _split_head(content: bytes) -> tuple[bytes, bytes]:
    end = content.find(b"\r\n\r\n")
    if end < 0:
        return content, b""
    return content[: end + 2], content[end + 2 :]


def _fields(head: bytes) -> list[bytes]:
    """The header fields, each with its folded continuation lines and final CRLF."""
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def _name(field: bytes) -> bytes:
    m = _FIELD_NAME.match(field)
    return m.group(1).lower() if m else b""


def _addresses(field: bytes) -> list[tuple[str, str]]:
    value = field.split(b":", 1)[1].decode("utf-8", "surrogateescape")
    value = " ".join(value.split())
    return [(n, a) for n, a in email.utils.getaddresses([value]) if "@" in a]


def reconcile(content: bytes, envelope: tuple[str, ...]) -> Reconciled:
    """The message to hand to a header-addressed API so that ``envelope`` and only it
    receives it (see the module doc)."""
    head, body = _split_head(content)
    fields = _fields(head)
    wanted = {r.lower() for r in envelope}
    seen: set[str] = set()
    removed: list[str] = []
    out: list[bytes] = []
    for field in fields:
        name = _name(field)
        if name not in _RECIPIENT_FIELDS:
            out.append(field)
            continue
        pairs = _addresses(field)
        keep = [(n, a) for n, a in pairs if a.lower() in wanted]
        seen.update(a.lower() for _, a in keep)
        if len(keep) == len(pairs):
            out.append(field)
            continue
        removed += [a for _, a in pairs if a.lower() not in wanted]
        label = field.split(b":", 1)[0]
        if keep:
            value = ", ".join(email.utils.formataddr((n, a)) for n, a in keep)
        else:
            value = "undisclosed-recipients:;"
        if keep or name != b"bcc":
            out.append(label + b": " + value.encode("utf-8", "surrogateescape") + b"\r\n")
    missing = tuple(r for r in envelope if r.lower() not in seen)
    if not missing and not removed:
        return Reconciled(content, (), ())
    prefix = b""
    if missing:
        prefix = b"Bcc: " + ", ".join(missing).encode("utf-8") + b"\r\n"
    return Reconciled(prefix + b"".join(out) + body, missing, tuple(dict.fromkeys(removed)))
