"""Header policy (SPEC routing rule 5), from tables: raw header bytes in, bytes or refusal out."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from relayd.core.routing import Refusal
from relayd.inbound.headers import (
    CheckedHeader,
    HeaderPolicy,
    apply_header_policy,
    parse_fields,
    parse_mailbox,
    single_mailbox,
)

SENDER = "alice@acme.example"
ALIAS = "frontdesk@acme.example"
NOW = datetime(2024, 3, 1, 12, 30, 5, tzinfo=timezone(timedelta(hours=1)))
DATE = b"Date: Fri, 01 Mar 2024 12:30:05 +0100\r\n"
ALERTS = b"alerts@acme.example"
MSGID = "<fixed@app01.acme.example>"
MSGID_LINE = b"Message-ID: <fixed@app01.acme.example>\r\n"
COMPLETE = DATE + MSGID_LINE  # fields that stop relayd adding Date and Message-ID

POLICY = HeaderPolicy(
    sender=SENDER,
    allowed=frozenset({SENDER, ALIAS}),
    from_name="Alice Example",
    helo_name="app01.acme.example",
)


def _rewrite(address: str) -> str:
    local, _, domain = address.lower().rpartition("@")
    if not local:  # bare local part
        local, domain = domain, "localhost"
    return "alerts@acme.example" if local == "root" and domain == "localhost" else address


REWRITTEN = HeaderPolicy(
    sender="alerts@acme.example",
    allowed=frozenset({"alerts@acme.example"}),
    from_name=None,
    helo_name="app01.acme.example",
    rewrite=_rewrite,
)


def apply(head: bytes, policy: HeaderPolicy = POLICY) -> bytes | Refusal:
    result = apply_header_policy(head, policy, now=NOW, message_id=MSGID)
    return result.head if isinstance(result, CheckedHeader) else result


# -- accepted: the received bytes come back unchanged, with any added fields on top -----

ACCEPTED_UNCHANGED = [
    b"From: alice@acme.example\r\n",
    b"From: <alice@acme.example>\r\n",
    b"From: ALICE@Acme.Example\r\n",
    b"From: Alice <alice@acme.example>\r\n",
    b'From: "Doe, Alice" <alice@acme.example>\r\n',
    b'From: "Alice \\"the boss\\"" <alice@acme.example>\r\n',
    b"From: =?utf-8?q?Doe,_Alice?= <alice@acme.example>\r\n",
    b"From: =?utf-8?b?w4RsaWNl?= <alice@acme.example>\r\n",
    b"From: \xc3\x84lice <alice@acme.example>\r\n",
    b"From: alice@acme.example (Alice, at work)\r\n",
    b"From: Mr. Alice <alice@acme.example>\r\n",
    b"From: frontdesk@acme.example\r\n",
    b"From: Alice\r\n <alice@acme.example>\r\n",
    b"FROM : alice@acme.example\r\n",
    b"From: alice@acme.example\r\nSender: frontdesk@acme.example\r\n",
    b"Subject: =?utf-8?q?gr=C3=BC=C3=9Fe?=\r\nFrom: alice@acme.example\r\nX-Raw: \xff\xfe\r\n",
]


@pytest.mark.parametrize("fields", ACCEPTED_UNCHANGED)
def test_accepted_header_bytes_are_relayed_as_received(fields: bytes) -> None:
    assert apply(fields + COMPLETE) == fields + COMPLETE


def test_missing_fields_are_added_at_the_top() -> None:
    head = b"Subject: hi\r\nTo: bob@example.net\r\n"
    assert apply(head) == (
        b'From: "Alice Example" <alice@acme.example>\r\n' + DATE + MSGID_LINE + head
    )


def test_only_the_missing_fields_are_added() -> None:
    head = b"Message-ID: <own@x>\r\nFrom: alice@acme.example\r\n"
    assert apply(head) == DATE + head
    head = b"date: Thu, 29 Feb 2024 10:00:00 +0000\r\nFrom: alice@acme.example\r\n"
    assert apply(head) == MSGID_LINE + head


@pytest.mark.parametrize(
    ("from_name", "line"),
    [
        (None, b"From: alice@acme.example\r\n"),
        ("", b"From: alice@acme.example\r\n"),
        ('Ali "A" Ce\\', b'From: "Ali \\"A\\" Ce\\\\" <alice@acme.example>\r\n'),
        ("Évelyne", b"From: =?utf-8?q?=C3=89velyne?= <alice@acme.example>\r\n"),
        ("Line\r\nBcc: eve@x", b'From: "Line Bcc: eve@x" <alice@acme.example>\r\n'),
    ],
)
def test_added_from_uses_from_name(from_name: str | None, line: bytes) -> None:
    policy = HeaderPolicy(SENDER, POLICY.allowed, from_name, POLICY.helo_name)
    assert apply(COMPLETE, policy) == line + COMPLETE


def test_generated_message_id_and_date() -> None:
    checked = apply_header_policy(b"From: alice@acme.example\r\n", POLICY)
    assert isinstance(checked, CheckedHeader)
    fields = {f.name: f.value() for f in parse_fields(checked.head)}
    assert checked.message_id == fields["message-id"]
    assert fields["message-id"].startswith("<") and fields["message-id"].endswith(
        "@app01.acme.example>"
    )
    assert fields["date"][:3] in {"Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"}


# -- refused: 550 5.7.1 and a reason ----------------------------------------------------

REFUSED = [
    (b"From: bob@acme.example\r\n", "<bob@acme.example> is not the sender"),
    (b"From: Alice <bob@acme.example>\r\n", "is not the sender"),
    (b'From: "alice@acme.example" <bob@acme.example>\r\n', "is not the sender"),
    (b"From: alice@acme.example.evil.example\r\n", "is not the sender"),
    (b"From: alice@acme.example, bob@acme.example\r\n", "names 2 mailboxes"),
    (b"From: alice@acme.example, alice@acme.example\r\n", "names 2 mailboxes"),
    (b"From: =?utf-8?q?x?= <alice@acme.example>, bob@x.example\r\n", "names 2 mailboxes"),
    (b"From: undisclosed:;\r\n", "names a group"),
    (b"From: team: alice@acme.example;\r\n", "names a group"),
    (b"From:\r\n", "names 0 mailboxes"),
    (b"From: alice@acme.example <bob@acme.example>\r\n", "is malformed"),
    (b"From: Alice <alice@acme.example> trailing\r\n", "is malformed"),
    (b"From: alice@\r\n", "cannot be parsed"),
    (b"From: <>\r\n", "is malformed"),
    (b"From: " + b", " * 100_000 + b"alice@acme.example\r\n", "is too long"),
    (b"From: " + b"a " * 1100 + b"<alice@acme.example>\r\n", "is too long"),
    (b"From: alice@acme.example\r\nFrom: alice@acme.example\r\n", "2 From: headers"),
    (b"From: alice@acme.example\r\nSender: bob@acme.example\r\n", "Sender: <bob@acme.example>"),
    (b"Sender: a@x\r\nSender: alice@acme.example\r\n", "2 Sender: headers"),
    (b"Sender: bob@acme.example\r\n", "Sender: <bob@acme.example>"),
]


@pytest.mark.parametrize(("fields", "reason"), REFUSED)
def test_refused(fields: bytes, reason: str) -> None:
    result = apply(fields + COMPLETE)
    assert isinstance(result, Refusal)
    assert result.reply.startswith("550 5.7.1 ")
    assert reason in result.reply


# -- rewrite_senders: a From: naming the rewritten mailbox follows the envelope ---------


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (b"From: root\r\n", b"From: alerts@acme.example\r\n"),
        (b"From: root@localhost\r\n", b"From: alerts@acme.example\r\n"),
        (b"From: root (Cron Daemon)\r\n", b'From: "Cron Daemon" <alerts@acme.example>\r\n'),
        (b"From: Cron Daemon <root@localhost>\r\n", b'From: "Cron Daemon" <%s>\r\n' % ALERTS),
        (
            b"from: =?utf-8?q?J=C3=B6rg?= <root>\r\n",
            b"from: =?utf-8?b?SsO2cmc=?= <%s>\r\n" % ALERTS,
        ),
        (b"From: alerts@acme.example\r\n", b"From: alerts@acme.example\r\n"),
    ],
)
def test_from_is_rewritten_with_the_envelope(field: bytes, expected: bytes) -> None:
    assert apply(field + COMPLETE, REWRITTEN) == expected + COMPLETE


def test_sender_field_is_rewritten_too() -> None:
    head = b"From: alerts@acme.example\r\nSender: root@localhost\r\n" + COMPLETE
    assert apply(head, REWRITTEN) == (
        b"From: alerts@acme.example\r\nSender: alerts@acme.example\r\n" + COMPLETE
    )


def test_rewrite_does_not_cover_other_mailboxes() -> None:
    result = apply(b"From: daemon@localhost\r\n" + COMPLETE, REWRITTEN)
    assert isinstance(result, Refusal)
    assert result.reply.startswith("550 5.7.1 From: <daemon@localhost>")


# -- the parts ---------------------------------------------------------------------------


def test_parse_fields_unfolds_for_reading_only() -> None:
    head = b"Subject: a\r\n  b\r\nFrom : x@y\r\n"
    fields = parse_fields(head)
    assert [(f.name, f.value()) for f in fields] == [("subject", "a  b"), ("from", "x@y")]
    assert b"".join(f.raw for f in fields) == head


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"Doe, John" <j@x.example>', ("Doe, John", "j@x.example")),
        ("=?utf-8?q?Doe,_John?= <j@x.example>", ("Doe, John", "j@x.example")),
        ("j@x.example (Doe, John)", ("", "j@x.example")),
        ('"x"@y.example', ("", "x@y.example")),
        ("a@x, b@y", "names 2 mailboxes, not one"),
        ("grp: a@x;", "names a group, not a mailbox"),
    ],
)
def test_single_mailbox(value: str, expected: tuple[str, str] | str) -> None:
    assert single_mailbox(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "alice@acme.example",
        "<alice@acme.example>",
        "Alice <alice@acme.example>",
        "Alice  Q.  Example <alice@acme.example>",
        "Alice Example<alice@acme.example>",
        '"Doe, Alice" <a.b+c@mail.acme.example>',
        '"" <alice@acme.example>',
        "o'brien@acme.example",
        "Grüße <alice@acme.example>",
        "=?utf-8?q?J=C3=B6rg?= <root@localhost>",
        "alice@acme.example, bob@acme.example",
        "alice@acme.example bob@acme.example",
        "<alice@acme.example> trailing",
        '"unterminated <alice@acme.example>',
    ],
)
def test_fast_path_agrees_with_the_parser(value: str) -> None:
    assert single_mailbox(value) == parse_mailbox(value)


def test_the_message_id_a_message_has_is_found_once_at_reception() -> None:
    head = b"From: alice@acme.example\r\nMessage-ID:\r\n <abc.def@app.example>\r\n"
    checked = apply_header_policy(head, POLICY, now=NOW)
    assert isinstance(checked, CheckedHeader)
    assert checked.message_id == "<abc.def@app.example>"  # unfolded (RFC 5322 §2.2.3)
    assert checked.head.endswith(head)  # relayed as received
    assert b"Message-ID" not in checked.head[: -len(head)]  # none added
