"""IMAP wire syntax: mailbox names, quoting, LIST and SEARCH parsing, SASL blobs, dates."""

from __future__ import annotations

import base64

import pytest

from relayd.sync import mutf7, wire

# -- modified UTF-7 (RFC 3501 §5.1.3) ----------------------------------------------------------

MUTF7 = [
    ("INBOX", "INBOX"),
    ("Sent Messages", "Sent Messages"),
    ("Tom & Jerry", "Tom &- Jerry"),
    ("&", "&-"),
    ("Éléments envoyés", "&AMk-l&AOk-ments envoy&AOk-s"),
    # RFC 3501 §5.1.3's own example.
    ("~peter/mail/台北/日本語", "~peter/mail/&U,BTFw-/&ZeVnLIqe-"),
    ("Отправленные", "&BB4EQgQ,BEAEMAQyBDsENQQ9BD0ESwQ1-"),
    ("😀 sent", "&2D3eAA- sent"),  # outside the BMP: a UTF-16 surrogate pair
    ("", ""),
]


@pytest.mark.parametrize(("text", "encoded"), MUTF7)
def test_mutf7_encodes_and_decodes(text: str, encoded: str) -> None:
    assert mutf7.encode(text) == encoded
    assert mutf7.decode(encoded) == text


@pytest.mark.parametrize("bad", ["&AMk", "&A-", "caf\u00e9", "&Zm9v!-"])
def test_mutf7_refuses_malformed_names(bad: str) -> None:
    with pytest.raises(ValueError):
        mutf7.decode(bad)


# -- quoting -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        ("Sent", '"Sent"'),
        ("Sent Messages", '"Sent Messages"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("", '""'),
    ],
)
def test_quote(text: str, quoted: str) -> None:
    assert wire.quote(text) == quoted


@pytest.mark.parametrize("bad", ["a\r\nb", "a\nb", "nul\0", "é"])
def test_quote_refuses_what_a_quoted_string_cannot_carry(bad: str) -> None:
    with pytest.raises(ValueError):
        wire.quote(bad)


def test_mailbox_argument_encodes_then_quotes() -> None:
    assert wire.mailbox_argument("Éléments envoyés") == '"&AMk-l&AOk-ments envoy&AOk-s"'
    assert wire.mailbox_argument("Sent Messages") == '"Sent Messages"'


# -- LIST (RFC 3501 §7.2.2, RFC 6154) ----------------------------------------------------------


def test_parse_list_as_collected_from_dovecot() -> None:
    lines: list[bytes | bytearray] = [
        b'(\\HasNoChildren) "." INBOX',
        b'(\\HasNoChildren \\Sent) "." "Sent Messages"',
        b'(\\HasNoChildren \\Trash) "." Trash',
        b"(\\Noselect \\HasChildren) NIL Archive",
        b"List completed (0.001 + 0.000 secs).",
    ]
    entries = wire.parse_list(lines)
    assert [e.name for e in entries] == ["INBOX", "Sent Messages", "Trash", "Archive"]
    assert entries[1].attributes == frozenset({"\\hasnochildren", "\\sent"})
    assert entries[1].delimiter == "."
    assert entries[3].delimiter is None
    sent = wire.find_special_use(entries, "\\Sent")
    assert sent is not None and sent.argument == '"Sent Messages"'


def test_parse_list_name_sent_as_a_literal() -> None:
    lines: list[bytes | bytearray] = [
        b'(\\Sent) "/" {13}',
        bytearray(b'Sent "quoted"'),
        b'(\\Drafts) "/" Drafts',
        b"List completed.",
    ]
    entries = wire.parse_list(lines)
    assert [(e.name, sorted(e.attributes)) for e in entries] == [
        ('Sent "quoted"', ["\\sent"]),
        ("Drafts", ["\\drafts"]),
    ]
    assert entries[0].argument == '"Sent \\"quoted\\""'


def test_parse_list_escaped_quotes_and_extended_data() -> None:
    lines: list[bytes | bytearray] = [
        b'(\\Sent \\Subscribed) "/" "a \\"b\\" c" ("CHILDINFO" ("SUBSCRIBED"))',
    ]
    [entry] = wire.parse_list(lines)
    assert entry.name == 'a "b" c'


def test_list_display_name_decodes_mutf7() -> None:
    [entry] = wire.parse_list([b'(\\Sent) "." "&AMk-l&AOk-ments envoy&AOk-s"'])
    assert entry.display_name == "Éléments envoyés"
    assert entry.argument == '"&AMk-l&AOk-ments envoy&AOk-s"'  # sent back as the server wrote it


def test_find_special_use_skips_unselectable_and_absent() -> None:
    entries = wire.parse_list(
        [
            b'(\\Sent \\NonExistent) "." Old',
            b'(\\Sent \\Noselect) "." Parent',
            b'(\\HasNoChildren) "." Sent',
        ]
    )
    assert wire.find_special_use(entries, "\\Sent") is None
    flagged = wire.parse_list([b'(\\HasNoChildren \\SENT) "." "Gesendete Objekte"'])
    found = wire.find_special_use(flagged, "\\Sent")
    assert found is not None and found.name == "Gesendete Objekte"


def test_parse_list_skips_garbage() -> None:
    assert wire.parse_list([b'(\\Sent "." "unterminated', b"(", b"nonsense"]) == []


# -- SEARCH, response codes --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "found"),
    [
        ([b"1 2 17", b"Search completed (0.001 + 0.000 secs)."], [1, 2, 17]),
        ([b"", b"Search completed."], []),
        ([b"SEARCH 4", b"OK"], [4]),
    ],
)
def test_parse_search(lines: list[bytes | bytearray], found: list[int]) -> None:
    assert wire.parse_search(lines) == found


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("[AUTHENTICATIONFAILED] Authentication failed.", "AUTHENTICATIONFAILED"),
        (b"[TRYCREATE] Mailbox doesn't exist: Sent", "TRYCREATE"),
        ("[APPENDUID 1795243817 2] Append completed", "APPENDUID"),
        ("Logged in", None),
    ],
)
def test_response_code(text: str | bytes, code: str | None) -> None:
    assert wire.response_code(text) == code


# -- SASL initial responses --------------------------------------------------------------------


def test_xoauth2_response_format() -> None:
    blob = wire.xoauth2_response("ops@host.example", "ya29.token")
    assert base64.b64decode(blob) == b"user=ops@host.example\x01auth=Bearer ya29.token\x01\x01"


def test_plain_response_carries_utf8() -> None:
    blob = wire.plain_response("anna@host.example", "pässwörd")
    assert base64.b64decode(blob) == b"\0anna@host.example\0" + "pässwörd".encode()


# -- what is filed -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "found"),
    [
        (b"From: a@b\r\nMessage-ID: <x1@t.example>\r\n\r\nbody", "<x1@t.example>"),
        (b"message-id:   <lower@case>  \r\nSubject: s\r\n\r\n", "<lower@case>"),
        (b"Message-ID:\r\n <folded@line>\r\n\r\n", "<folded@line>"),
        (b"Subject: none\r\n\r\nMessage-ID: <in@body>\r\n", None),
        (b"From: a@b\r\n\r\n", None),
    ],
)
def test_message_id(content: bytes, found: str | None) -> None:
    assert wire.message_id(content) == found


def test_internal_date_is_rfc3501_date_time_in_utc() -> None:
    assert wire.internal_date(1_700_000_000.0) == '"14-Nov-2023 22:13:20 +0000"'
    assert wire.internal_date(0) == '"01-Jan-1970 00:00:00 +0000"'
