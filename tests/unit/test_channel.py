"""Upstream replies read off a connection that pipelines (relayd.upstream.channel)."""

from __future__ import annotations

import aiosmtplib
import pytest

from relayd.core.outcome import Reply
from relayd.upstream.channel import parse_replies


def test_replies_come_off_the_buffer_in_order_and_partial_ones_wait() -> None:
    buffer = bytearray(b"250 2.1.0 ok\r\n250-2.1.5 first\r\n250 2.1.5 second\r\n354 go\r\n55")
    assert parse_replies(buffer) == [
        Reply(250, "2.1.0 ok"),
        Reply(250, "2.1.5 first 2.1.5 second"),
        Reply(354, "go"),
    ]
    assert buffer == b"55"
    buffer += b"4 5.5.1 no\r\n"
    assert parse_replies(buffer) == [Reply(554, "5.5.1 no")]
    assert buffer == b""


def test_a_multi_line_reply_waits_for_its_last_line() -> None:
    buffer = bytearray(b"250-one\r\n250-two\r\n")
    assert parse_replies(buffer) == []
    buffer += b"250 three\n"  # a bare LF ends a line too
    assert parse_replies(buffer) == [Reply(250, "one two three")]


@pytest.mark.parametrize("line", [b"hello\r\n", b"25\r\n", b"250_x\r\n", b"abc ok\r\n"])
def test_a_malformed_line_is_a_protocol_error(line: bytes) -> None:
    with pytest.raises(aiosmtplib.SMTPException):
        parse_replies(bytearray(line))


def test_an_endless_line_is_refused() -> None:
    with pytest.raises(aiosmtplib.SMTPException):
        parse_replies(bytearray(b"250 " + b"x" * (1 << 17)))
