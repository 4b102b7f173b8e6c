"""Proof Key for Code Exchange (RFC 7636), S256 only: pure functions.

RFC 8252 §8.1 requires PKCE of native apps, and the OAuth 2.0 Security BCP (RFC 9700 §2.1.1)
of every client using the authorization code: relayd's web sign-in always sends a
``code_challenge`` and redeems the code with its ``code_verifier``, so a code caught on its
way back through the browser is worth nothing without the verifier, which never leaves
relayd's memory.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

__all__ = ["METHOD", "challenge_of", "is_verifier", "new_verifier"]

#: RFC 7636 §4.2: "plain" exists for clients that cannot hash; relayd can.
METHOD = "S256"

# RFC 7636 §4.1: 43-128 characters of [A-Z] / [a-z] / [0-9] / "-" / "." / "_" / "~".
_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")


def new_verifier() -> str:
    """32 random octets, base64url without padding: 43 characters (RFC 7636 §4.1)."""
    return secrets.token_urlsafe(32)


def is_verifier(text: object) -> bool:
    return isinstance(text, str) and _VERIFIER.fullmatch(text) is not None


def challenge_of(verifier: str) -> str:
    """``BASE64URL(SHA256(ASCII(code_verifier)))`` without padding (RFC 7636 §4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")
