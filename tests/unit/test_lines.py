"""The one line-ending normaliser (relayd.core.lines), against aiosmtplib's own."""

from __future__ import annotations

import pytest

from relayd.core.lines import as_delivered, is_crlf_only, to_crlf


@pytest.mark.parametrize(
    ("content", "delivered"),
    [
        (b"A: b\r\n\r\nline\r\n", b"A: b\r\n\r\nline\r\n"),
        (b"A: b\r\n\r\nno end", b"A: b\r\n\r\nno end\r\n"),
        (b"A: b\r\n\r\nlone\rcr\r\n", b"A: b\r\n\r\nlone\r\ncr\r\n"),
        (b"A: b\r\n\r\n.dot stays\r\n", b"A: b\r\n\r\n.dot stays\r\n"),
    ],
)
def test_as_delivered_matches_what_aiosmtplib_sends(content: bytes, delivered: bytes) -> None:
    from aiosmtplib.protocol import normalize_message_line_endings

    assert as_delivered(content) == delivered
    assert normalize_message_line_endings(content) == delivered


def test_to_crlf_returns_crlf_content_itself() -> None:
    content = b"A: b\r\n\r\nbody\r\n"
    assert is_crlf_only(content)
    assert to_crlf(content) is content
    assert to_crlf(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd"
