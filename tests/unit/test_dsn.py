"""Delivery status notifications: RFC 3464 inside a RFC 6522 multipart/report."""

from __future__ import annotations

import email
import email.policy
import email.utils
import re
from email.message import Message

import pytest

from relayd.upstream.dsn import BouncedRecipient, build_dsn

ORIGINAL = (
    b"From: Alice <alice@acme.example>\r\n"
    b"To: bob@dest.example, carol@dest.example\r\n"
    b"Subject: Quarterly report\r\n"
    b"Message-ID: <orig-1@acme.example>\r\n"
    b"\r\n"
    b"CONFIDENTIAL BODY LINE 1\r\n"
    b"\r\n"
    b"CONFIDENTIAL BODY LINE 2\r\n"
)
BOB = BouncedRecipient(
    "bob@dest.example", "5.1.1", "550 5.1.1 <bob@dest.example>: User unknown", "mx.dest.example"
)
CAROL = BouncedRecipient("carol@dest.example", "4.4.7", "delivery time expired; 451 4.2.0 x", "")


def dsn(
    recipients: list[BouncedRecipient] | None = None,
    original: bytes = ORIGINAL,
    reason: str = "The receiving server refused these recipients permanently.",
    original_sender: str = "alice@acme.example",
    retry_until: float | None = None,
) -> bytes:
    return build_dsn(
        queue_id="0000Q1",
        reporting_host="app01.acme.example",
        from_address="alice@acme.example",
        to_address="alice@acme.example",
        original_sender=original_sender,
        received_at=1_700_000_000.0,
        recipients=[BOB, CAROL] if recipients is None else recipients,
        original_content=original,
        reason=reason,
        retry_until=retry_until,
    )


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def subparts(msg: Message) -> list[Message]:
    """The parts of a multipart message, or the field blocks of a message/delivery-status."""
    payload = msg.get_payload()
    assert isinstance(payload, list)
    parts = [part for part in payload if isinstance(part, Message)]
    assert len(parts) == len(payload), payload
    return parts


def header_section(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def test_top_level_is_a_delivery_status_report() -> None:
    msg = parse(dsn())
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["To"] == "<alice@acme.example>"
    assert "<alice@acme.example>" in msg["From"]
    assert "0000Q1" in msg["Subject"]
    assert msg["Date"]
    assert re.fullmatch(r"<[^<>@\s]+@app01\.acme\.example>", msg["Message-ID"])
    parts = subparts(msg)
    assert [p.get_content_type() for p in parts] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]
    for name in ("From", "To", "Subject", "Date", "Message-ID", "Auto-Submitted"):
        assert len(msg.get_all(name, [])) == 1, name


def test_each_dsn_has_its_own_boundary_and_message_id() -> None:
    one, two = parse(dsn()), parse(dsn())
    assert one.get_boundary() != two.get_boundary()
    assert one["Message-ID"] != two["Message-ID"]


def _status_groups(raw: bytes) -> list[dict[str, str]]:
    """The delivery-status part as blocks of fields (per-message first), read from the bytes."""
    boundary = parse(raw).get_boundary()
    assert boundary is not None
    parts = raw.split(b"--" + boundary.encode())
    (part,) = [p for p in parts if b"Content-Type: message/delivery-status" in p]
    body = part.split(b"\r\n\r\n", 1)[1].strip(b"\r\n")
    groups = []
    for block in body.split(b"\r\n\r\n"):
        fields: dict[str, str] = {}
        for line in block.split(b"\r\n"):
            name, _, value = line.decode("ascii").partition(":")
            assert name not in fields, f"{name} twice in one group"
            fields[name] = value.strip()
        groups.append(fields)
    return groups


def test_delivery_status_fields() -> None:
    per_message, bob, carol = _status_groups(dsn())
    assert per_message["Reporting-MTA"] == "dns; app01.acme.example"
    assert per_message["Arrival-Date"]
    assert bob == {
        "Final-Recipient": "rfc822; bob@dest.example",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.dest.example",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob@dest.example>: User unknown",
    }
    # Without a remote MTA (e.g. expired before any server answered) the field is left out.
    assert carol == {
        "Final-Recipient": "rfc822; carol@dest.example",
        "Action": "failed",
        "Status": "4.4.7",
        "Diagnostic-Code": "smtp; delivery time expired; 451 4.2.0 x",
    }


def test_email_package_reads_the_same_status_groups() -> None:
    parts = subparts(parse(dsn()))
    groups = subparts(parts[1])
    assert [g.get("Final-Recipient") for g in groups] == [
        None,
        "rfc822; bob@dest.example",
        "rfc822; carol@dest.example",
    ]
    assert [g.get("Action") for g in groups[1:]] == ["failed", "failed"]


def test_human_readable_part_names_every_bounced_recipient() -> None:
    parts = subparts(parse(dsn()))
    text = parts[0].get_payload()
    assert "0000Q1" in text
    assert "<bob@dest.example>: 550 5.1.1" in text
    assert "<carol@dest.example>" in text
    assert "refused these recipients permanently" in text


@pytest.mark.parametrize(
    "original",
    [
        ORIGINAL,
        ORIGINAL.replace(b"CONFIDENTIAL BODY LINE 1", b"From: not-a-header@in-the-body"),
    ],
)
def test_only_the_original_header_section_is_returned(original: bytes) -> None:
    raw = dsn(original=original)
    assert b"CONFIDENTIAL BODY" not in raw
    assert b"not-a-header@in-the-body" not in raw
    parts = subparts(parse(raw))
    headers = parts[2].get_payload()
    assert isinstance(headers, str)
    expected = original.split(b"\r\n\r\n")[0].decode().split("\r\n")
    assert [line for line in headers.splitlines() if line] == expected
    assert header_section(original) in raw


def test_a_message_without_body_is_returned_whole() -> None:
    original = b"From: alice@acme.example\r\nSubject: headers only\r\n"
    raw = dsn(original=original)
    assert original in raw


NON_ASCII = BouncedRecipient(
    "jörg@bücher.example",
    "5.1.1",
    "550 5.1.1 Empfänger unbekannt – «Postfach» nicht gefunden ✉",
    "mx.bücher.example",
)
INJECTION = BouncedRecipient(
    "eve@dest.example",
    "5.7.1",
    "550 5.7.1 nope\r\nBcc: victim@example.com\nX-Injected: 1\rAction: delivered",
    "mx.dest.example",
)

CASES = [
    pytest.param([BOB, CAROL], "plain reason", "alice@acme.example", id="plain"),
    pytest.param([NON_ASCII], "Zustellung gescheitert: ü", "jörg@bücher.example", id="non-ascii"),
    pytest.param([INJECTION], "line one\nline two\r\nline three\r", "a@b.example", id="crlf"),
]


@pytest.mark.parametrize(("recipients", "reason", "sender"), CASES)
def test_crlf_line_endings_throughout(
    recipients: list[BouncedRecipient], reason: str, sender: str
) -> None:
    raw = dsn(recipients, reason=reason, original_sender=sender)
    assert re.search(rb"(?<!\r)\n", raw) is None, "bare LF"
    assert re.search(rb"\r(?!\n)", raw) is None, "bare CR"
    assert raw.endswith(b"--\r\n")


@pytest.mark.parametrize(("recipients", "reason", "sender"), CASES)
def test_ascii_only(recipients: list[BouncedRecipient], reason: str, sender: str) -> None:
    raw = dsn(recipients, reason=reason, original_sender=sender)
    raw.decode("ascii")  # raises on any 8-bit byte
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


def test_diagnostic_text_cannot_inject_fields_or_headers() -> None:
    raw = dsn([INJECTION])
    lines = raw.split(b"\r\n")
    assert not any(line.startswith((b"Bcc:", b"X-Injected:")) for line in lines)
    assert lines.count(b"Action: failed") == 1
    assert b"Action: delivered" not in lines
    (_, eve) = _status_groups(raw)
    assert eve["Action"] == "failed"
    assert eve["Diagnostic-Code"].startswith("smtp; 550 5.7.1 nope")


def test_non_ascii_diagnostic_is_kept_readable() -> None:
    (_, group) = _status_groups(dsn([NON_ASCII]))
    assert group["Status"] == "5.1.1"
    assert group["Diagnostic-Code"].startswith("smtp; 550 5.1.1 Empf")
    assert "unbekannt" in group["Diagnostic-Code"]


def _huge_header_section() -> bytes:
    # Over 64 KiB of header lines, with the CR of a CRLF as the 65536th byte.
    head = b"".join(b"X-Trace-%04d: " % i + b"a" * 85 + b"\r\n" for i in range(640))
    head += b"X-Pad: " + b"p" * (65535 - len(head) - 7) + b"\r\n"
    assert head[65535:65537] == b"\r\n"
    return head + b"Subject: after the limit\r\n\r\nbody\r\n"


def test_a_huge_header_section_is_cut_at_a_line_end() -> None:
    raw = dsn(original=_huge_header_section())
    assert re.search(rb"\r(?!\n)", raw) is None, "bare CR"
    assert re.search(rb"(?<!\r)\n", raw) is None, "bare LF"


def test_a_delay_warning_says_delayed_and_until_when() -> None:
    carol_waiting = BouncedRecipient("carol@dest.example", "4.2.0", "451 4.2.0 busy", "")
    raw = dsn([carol_waiting], reason="This is a warning only.", retry_until=1_700_432_000.0)
    msg = parse(raw)
    assert msg["Subject"].startswith("Delayed Mail (still being retried)")
    status = subparts(subparts(msg)[1])
    fields = status[1]
    assert fields["Action"] == "delayed" and fields["Status"] == "4.2.0"
    assert fields["Will-Retry-Until"] == email.utils.formatdate(1_700_432_000.0, localtime=True)
    assert b"has not yet delivered your message 0000Q1" in raw
    assert b"Action: failed" not in raw and b"Will-Retry-Until" not in dsn()
