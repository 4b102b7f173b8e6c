"""Line endings: SMTP content is CRLF throughout (RFC 5321 §2.3.8)."""

from __future__ import annotations

__all__ = ["is_crlf_only", "to_crlf"]


def is_crlf_only(block: bytes) -> bool:
    crlf = block.count(b"\r\n")
    return block.count(b"\n") == crlf and block.count(b"\r") == crlf


def to_crlf(block: bytes) -> bytes:
    """Bare LF and bare CR become CRLF (Postfix 3.9 ``smtpd_forbid_bare_newline = normalize``).

    ``block`` never ends with a CR whose LF may still be coming: callers hold it back.
    """
    if is_crlf_only(block):
        return block  # the usual case: already CRLF throughout, no copy
    return block.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
