"""Delivery status notifications (RFC 3464), written by relayd for the sender's own mailbox.

Built as bytes, not through the email package's serialiser (CVE-2024-6923, header injection
through re-folding); the original message's header section is attached as
text/rfc822-headers (RFC 6522 §3), so a DSN never carries the whole original body back.
"""

from __future__ import annotations

import email.utils
import secrets
import time
from dataclasses import dataclass

__all__ = ["HEADER_LIMIT", "BouncedRecipient", "build_dsn"]


@dataclass(frozen=True)
class BouncedRecipient:
    address: str
    status: str  # enhanced code, e.g. "5.7.1"
    diagnostic: str  # the remote reply, e.g. "554 5.7.1 <x@y>: Recipient address rejected"
    remote_mta: str  # "mail.example.com"


# The most of the original header section a DSN carries back.
HEADER_LIMIT = 64 * 1024


def _header_section(content: bytes, limit: int = HEADER_LIMIT) -> bytes:
    end = content.find(b"\r\n\r\n")
    head = content[: end + 2] if end >= 0 else content
    if len(head) > limit:
        # Cut at a line end, so the DSN stays CRLF throughout with no half header line.
        cut = head.rfind(b"\r\n", 0, limit)
        head = head[: cut + 2] if cut >= 0 else b""
    return head


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode().replace("\r", " ").replace("\n", " ")


def build_dsn(
    *,
    queue_id: str,
    reporting_host: str,
    from_address: str,
    to_address: str,
    original_sender: str,
    received_at: float,
    recipients: list[BouncedRecipient],
    original_content: bytes,
    reason: str,
    retry_until: float | None = None,
) -> bytes:
    """A DSN about ``recipients``: "failed" ones (RFC 3464 §2.3.3), or with ``retry_until``
    (when relayd gives up) "delayed" ones, a warning while delivery goes on."""
    delayed = retry_until is not None
    boundary = f"relayd-dsn-{secrets.token_hex(8)}"
    now = time.time()
    subject = (
        f"Delayed Mail (still being retried) ({queue_id})"
        if delayed
        else f"Undelivered Mail Returned to Sender ({queue_id})"
    )
    lines = [
        f"From: Mail Delivery System <{from_address}>",
        f"To: <{to_address}>",
        f"Subject: {subject}",
        f"Date: {email.utils.formatdate(now, localtime=True)}",
        f"Message-ID: <{queue_id}.dsn.{secrets.token_hex(6)}@{reporting_host}>",
        "Auto-Submitted: auto-replied",  # RFC 3834: no DSN is ever written about this one
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        f"relayd on {reporting_host} "
        + ("has not yet delivered" if delayed else "could not deliver")
        + f" your message {queue_id}",
        f"sent as <{_ascii(original_sender)}> to the following recipients:",
        "",
    ]
    for r in recipients:
        lines.append(f"  <{_ascii(r.address)}>: {_ascii(r.diagnostic)}")
    lines += ["", _ascii(reason), "", f"--{boundary}", "Content-Type: message/delivery-status", ""]
    lines += [
        f"Reporting-MTA: dns; {reporting_host}",
        f"X-Relayd-Queue-ID: {queue_id}",
        f"Arrival-Date: {email.utils.formatdate(received_at, localtime=True)}",
    ]
    for r in recipients:
        lines += [
            "",
            f"Final-Recipient: rfc822; {_ascii(r.address)}",
            "Action: delayed" if delayed else "Action: failed",
            f"Status: {r.status}",
        ]
        if r.remote_mta:
            lines.append(f"Remote-MTA: dns; {_ascii(r.remote_mta)}")
        lines.append(f"Diagnostic-Code: smtp; {_ascii(r.diagnostic)}")
        if retry_until is not None:
            lines.append(f"Will-Retry-Until: {email.utils.formatdate(retry_until, localtime=True)}")
    lines += ["", f"--{boundary}", "Content-Type: text/rfc822-headers", ""]
    head = "\r\n".join(lines).encode() + b"\r\n"
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + _header_section(original_content) + tail
