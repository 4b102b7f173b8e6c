"""The DATA decoder and the header-section splitter, from tables (no sockets)."""

from __future__ import annotations

import pytest

from relayd.inbound.data import (
    NUL_REPLY,
    SIZE_REPLY,
    DataDecoder,
    HeaderSection,
)

BIG = 1 << 30
EIGHT_BIT = bytes(range(0x80, 0x100)) + b"\x01\x0b\x7f\r\n"
MBOX_LINE = b"From sender@x Mon Jan  1 00:00:00 2024\r\n"

# (raw DATA content as the server hands it over, content relayd stores)
DECODE_CASES = [
    (b"", b""),
    (b"\r\n", b"\r\n"),
    (b"a\r\nb\r\n", b"a\r\nb\r\n"),
    # RFC 5321 §4.5.2: one leading dot removed, on the first line too
    (b".x\r\n", b"x\r\n"),
    (b"..x\r\n", b".x\r\n"),
    (b"a\r\n..\r\n", b"a\r\n.\r\n"),
    (b"a\r\n.\r\n.\r\nb\r\n", b"a\r\n\r\n\r\nb\r\n"),
    (b"a.\r\nb.c\r\n", b"a.\r\nb.c\r\n"),
    # bare LF and bare CR become CRLF (Postfix 3.9 normalize)
    (b"a\nb\n", b"a\r\nb\r\n"),
    (b"a\rb\r\n", b"a\r\nb\r\n"),
    (b"a\r\r\n", b"a\r\n\r\n"),
    (b"a\n\r\n", b"a\r\n\r\n"),
    (b"\n\r", b"\r\n\r\n"),
    # SMTP smuggling sequences (bare LF or CR around the dot) are content, unstuffed
    (b"a\n.\nb\r\n", b"a\r\n\r\nb\r\n"),
    (b"a\n.\r\nb\r\n", b"a\r\n\r\nb\r\n"),
    (b"a\r.\r\nb\r\n", b"a\r\n\r\nb\r\n"),
    (b"a\r\n.\rb\r\n", b"a\r\n\r\nb\r\n"),
    (b"a\r\n.\nb\r\n", b"a\r\n\r\nb\r\n"),
    # a dot after a bare line end starts a line too
    (b"a\n..b\r\n", b"a\r\n.b\r\n"),
    # 8-bit and UTF-8 bytes pass untouched
    ("grüße ✓\r\n".encode(), "grüße ✓\r\n".encode()),
    (EIGHT_BIT, EIGHT_BIT),
    # long lines are relayed as they are
    (b"x" * 100_000 + b"\r\n", b"x" * 100_000 + b"\r\n"),
]


def decode(chunks: list[bytes], max_size: int = BIG) -> tuple[bytes, DataDecoder]:
    decoder = DataDecoder(max_size)
    out = b"".join(decoder.feed(chunk) for chunk in chunks) + decoder.end()
    return out, decoder


@pytest.mark.parametrize(("raw", "expected"), DECODE_CASES)
def test_decode_in_one_block(raw: bytes, expected: bytes) -> None:
    out, decoder = decode([raw])
    assert out == expected
    assert decoder.refusal is None
    assert decoder.size == len(expected)


@pytest.mark.parametrize(("raw", "expected"), [c for c in DECODE_CASES if len(c[0]) < 1000])
def test_decode_is_independent_of_block_boundaries(raw: bytes, expected: bytes) -> None:
    for cut in range(len(raw) + 1):
        assert decode([raw[:cut], raw[cut:]])[0] == expected, cut
    for cut in range(len(raw)):
        assert decode([raw[:cut], raw[cut : cut + 1], raw[cut + 1 :]])[0] == expected, cut
    assert decode([raw[i : i + 1] for i in range(len(raw))])[0] == expected


@pytest.mark.parametrize(
    "raw",
    [b"\x00", b"a\x00b\r\n", b"a\r\n\x00.\r\n", b"header: x\r\n\r\nbody\x00"],
)
def test_nul_anywhere_is_refused_and_nothing_more_is_returned(raw: bytes) -> None:
    decoder = DataDecoder(BIG)
    decoder.feed(raw)
    assert decoder.refusal == NUL_REPLY
    assert decoder.feed(b"more\r\n") == b""
    assert decoder.end() == b""


def test_nul_in_a_later_block() -> None:
    decoder = DataDecoder(BIG)
    assert decoder.feed(b"a\r\n") == b"a\r\n"
    assert decoder.feed(b"b\x00\r\n") == b""
    assert decoder.refusal == NUL_REPLY


@pytest.mark.parametrize(
    ("chunks", "max_size", "refused"),
    [
        ([b"12345678\r\n"], 10, False),
        ([b"123456789\r\n"], 10, True),
        ([b"1234\r\n", b"5678\r\n"], 12, False),
        ([b"1234\r\n", b"5678\r\n"], 11, True),
        # the size is that of the stored content: unstuffed and normalised
        ([b"..12345\n"], 8, False),
        # a trailing CR is counted when it is released
        ([b"123456789\r"], 10, True),
    ],
)
def test_size_limit(chunks: list[bytes], max_size: int, refused: bool) -> None:
    out, decoder = decode(chunks, max_size)
    assert (decoder.refusal == SIZE_REPLY) is refused
    if refused:
        assert decoder.feed(b"more\r\n") == b""
    else:
        assert len(out) <= max_size


# (content, (head, rest)) — head: the header lines; rest: the empty line or first body line on
HEADER_CASES = [
    (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", (b"A: 1\r\nB: 2\r\n", b"\r\nbody\r\n")),
    (b"A: 1\r\n folded\r\n\tmore\r\n\r\n", (b"A: 1\r\n folded\r\n\tmore\r\n", b"\r\n")),
    (b"\r\nbody\r\n", (b"", b"\r\nbody\r\n")),
    (b"", (b"", b"")),
    (b"A: 1\r\n", (b"A: 1\r\n", b"")),
    # no empty line: the first line that is not a field starts the body
    (b"A: 1\r\nhello world\r\nB: 2\r\n", (b"A: 1\r\n", b"hello world\r\nB: 2\r\n")),
    (b"hello\r\n\r\nworld\r\n", (b"", b"hello\r\n\r\nworld\r\n")),
    (MBOX_LINE, (b"", MBOX_LINE)),
    (b" leading continuation\r\n", (b"", b" leading continuation\r\n")),
    # obsolete white space before the colon (RFC 5322 §4.5) is still a field
    (b"From : a@b\r\n\r\n", (b"From : a@b\r\n", b"\r\n")),
    (b"X-8bit: gr\xc3\xbc\xc3\x9fe\r\n\r\n", (b"X-8bit: gr\xc3\xbc\xc3\x9fe\r\n", b"\r\n")),
]


def split(chunks: list[bytes], limit: int = 1 << 20) -> tuple[bytes, bytes] | None:
    section = HeaderSection(limit)
    for index, chunk in enumerate(chunks):
        result = section.feed(chunk)
        if result is not None:
            head, rest = result
            return head, rest + b"".join(chunks[index + 1 :])  # what was not fed yet
    return section.finish()


@pytest.mark.parametrize(("content", "expected"), HEADER_CASES)
def test_header_section(content: bytes, expected: tuple[bytes, bytes]) -> None:
    assert split([content]) == expected


@pytest.mark.parametrize(("content", "expected"), HEADER_CASES)
def test_header_section_byte_by_byte(content: bytes, expected: tuple[bytes, bytes]) -> None:
    chunks = [content[i : i + 1] for i in range(len(content))]
    head, rest = split(chunks) or (b"?", b"?")
    assert head == expected[0]
    assert head + rest == content


def test_header_section_too_large() -> None:
    section = HeaderSection(limit=100)
    assert section.feed(b"X-A: " + b"a" * 50 + b"\r\n") is None
    assert section.feed(b"X-B: " + b"b" * 50 + b"\r\n") is None
    assert section.too_large
    assert section.feed(b"\r\nbody") is None
    assert section.finish() is None


def test_header_section_too_large_even_when_it_ends_in_the_same_block() -> None:
    section = HeaderSection(limit=100)
    assert section.feed(b"X-A: " + b"a" * 200 + b"\r\n\r\nbody\r\n") is None
    assert section.too_large


def test_a_long_first_body_line_is_not_mistaken_for_a_header_section() -> None:
    section = HeaderSection(limit=1000)
    assert section.feed(b"this is no header field") == (b"", b"this is no header field")


def test_a_long_unfinished_field_is_held_until_the_limit() -> None:
    section = HeaderSection(limit=1000)
    assert section.feed(b"X-Long: " + b"x" * 500) is None
    assert not section.too_large
    assert section.feed(b"x" * 600) is None
    assert section.too_large
