"""The XOAUTH2 SASL exchange, as pure functions (SMTP now, IMAP for the Sent copy later).

Google's and Microsoft's XOAUTH2: the client response is
``base64("user=" user "\\x01auth=Bearer " token "\\x01\\x01")``. It is sent *after* the
server's empty ``334`` challenge, on its own line — never as an initial response on the
``AUTH`` line: a 2 KB token makes a 3 KB line, and servers cap command lines at 2048 bytes
(Postfix ``line_length_limit``; RFC 4954 §4 only guarantees 512 octets for the AUTH line,
while continuation lines have their own, larger limit: Postfix ``smtpd_sasl_response_limit``).

When the server refuses the token it does not say so at once: it sends a second ``334`` whose
payload is a base64 JSON error (``{"status":"401","schemes":"bearer","scope":"..."}``, the
shape RFC 7628 §3.2.2 standardised for OAUTHBEARER), and waits for the client to answer it
with an empty response before giving the final ``535``. A client that does not answer hangs
until its timeout and cannot tell "bad token" (hold) from "server gone" (defer).
"""

from __future__ import annotations

import base64
import binascii
import json

__all__ = ["error_challenge_status", "xoauth2_response"]


def xoauth2_response(user: str, token: str) -> bytes:
    """The base64 client response for ``user`` and the bearer ``token``."""
    if "\x01" in user or "\x01" in token:
        raise ValueError("XOAUTH2 fields must not contain \\x01")
    raw = f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    return base64.b64encode(raw)


def error_challenge_status(challenge: str) -> str:
    """The ``status`` of a server's XOAUTH2 error challenge (``"401"``, ``"400"``...), or
    ``""`` when the challenge is not the JSON error object."""
    try:
        doc = json.loads(base64.b64decode(challenge.strip(), validate=True))
    except (binascii.Error, ValueError):
        return ""
    if not isinstance(doc, dict):
        return ""
    status = doc.get("status")
    return str(status) if isinstance(status, str | int) else ""
