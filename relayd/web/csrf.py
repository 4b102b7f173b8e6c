"""CSRF protection for the pages' forms (OWASP CSRF Prevention Cheat Sheet): the
synchronizer token pattern, plus the Origin check as defence in depth.

Every browser session gets a random token, put into each form it is shown as a hidden field;
a POST is accepted only when the field equals the session's token (compared in constant
time). The session cookie is ``SameSite=Lax``, so a cross-site form post arrives without it
anyway; the token protects the browsers that do not honour SameSite. When the browser sends
an ``Origin`` header, it must be relayd's own (OWASP "Verifying Origin with standard
headers").
"""

from __future__ import annotations

import hmac
import secrets
from urllib.parse import urlsplit

__all__ = ["FIELD", "new_csrf_token", "origin_allowed", "token_matches"]

#: The hidden form field that carries the token.
FIELD = "csrf"


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def token_matches(expected: str | None, submitted: object) -> bool:
    if not expected or not isinstance(submitted, str) or not submitted:
        return False
    return hmac.compare_digest(expected.encode(), submitted.encode())


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


def origin_allowed(origin: str | None, public_url: str, served_at: str) -> bool:
    """No Origin header (older browsers), or ``null`` (what browsers send under a strict
    referrer policy or a privacy setting): allowed, the token decides. A foreign origin:
    refused. ``served_at`` is the origin the request arrived at (http://127.0.0.1:8425
    through an SSH tunnel), ``public_url`` the configured one (a reverse proxy)."""
    if origin is None or origin == "null":
        return True
    return _origin(origin) in (_origin(public_url), _origin(served_at))
