"""Line endings: SMTP content is CRLF throughout (RFC 5321 §2.3.8).

The one normaliser of relayd: the SMTP listener's DATA decoder, the maildrop, the upstream
DATA phase and the Sent copy all make line endings CRLF through ``to_crlf``.
"""

from __future__ import annotations

__all__ = ["as_delivered", "is_crlf_only", "to_crlf"]


def is_crlf_only(block: bytes) -> bool:
    crlf = block.count(b"\r\n")
    return block.count(b"\n") == crlf and block.count(b"\r") == crlf


def to_crlf(block: bytes) -> bytes:
    """Bare LF and bare CR become CRLF (Postfix 3.9 ``smtpd_forbid_bare_newline = normalize``).

    A caller feeding a stream block by block holds back a CR at the end of a block whose LF
    may still be coming.
    """
    if is_crlf_only(block):
        return block  # the usual case: already CRLF throughout, no copy
    return block.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def as_delivered(content: bytes) -> bytes:
    """The message as an SMTP server receives it once the transparency dots are removed
    (RFC 5321 §4.5.2): CRLF line endings and, unless empty, a CRLF at the end.

    This is what the DATA phase sends (and what aiosmtplib would send), so it is also the
    Sent copy: "the exact bytes that were delivered" (SPEC "Sent copy").
    """
    content = to_crlf(content)
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    return content
