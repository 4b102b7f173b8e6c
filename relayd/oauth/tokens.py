"""What a token source hands out and how it fails: small records, pure rules.

The upstream asks one question — "a valid access token for this account, now" — and gets an
``AccessToken`` or one of two errors whose difference matters more than anything else here:

- ``TokenEndpointUnavailable``: network error, timeout, HTTP 5xx, a garbled answer. Nothing
  is wrong with the grant; the mail is *deferred* and the stored tokens are left alone
  (deleting tokens on a transient error is the best-known OAuth proxy's most common bug).
- ``ConsentRequired``: the token endpoint refused the grant itself (RFC 6749 §5.2
  ``invalid_grant`` — refresh token expired, revoked, password changed — or
  ``invalid_client`` / ``unauthorized_client``), or nobody has consented yet. Only a human can
  fix it (``relayd auth ADDRESS``, or the app registration): the mail is *held*.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from relayd.config.model import AccountConfig
from relayd.errors import RelaydError

__all__ = [
    "REFRESH_MARGIN",
    "AccessToken",
    "ConsentRequired",
    "Grant",
    "TokenEndpointUnavailable",
    "TokenError",
    "TokenSource",
    "grant_error",
    "needs_refresh",
]

#: Refresh when less than this many seconds remain (SPEC). Microsoft's high-volume endpoint
#: answers "token will expire soon" below ten minutes, and msal (5 min) and google-auth
#: (3 min 45 s) would otherwise hand out tokens that close to expiry.
REFRESH_MARGIN = 600.0

#: RFC 6749 §5.2 error codes that mean "this grant or this client will not work again until a
#: human acts". Everything else (server_error, temporarily_unavailable, slow_down, rate
#: limits, unknown codes) is treated as transient.
REFUSING_ERRORS = frozenset({"invalid_grant", "invalid_client", "unauthorized_client"})


class TokenError(RelaydError):
    """Base of the token errors; messages never contain a token or a secret."""


class TokenEndpointUnavailable(TokenError):
    """Transient: try again later, keep every stored token."""


class ConsentRequired(TokenError):
    """The grant was refused (or never given): a human must act; mail is held meanwhile."""

    def __init__(self, message: str, *, error: str = "invalid_grant") -> None:
        super().__init__(message)
        self.error = error


@dataclass(frozen=True)
class AccessToken:
    value: str = field(repr=False)
    expires_at: float  # epoch seconds

    def remaining(self, now: float) -> float:
        return self.expires_at - now


@dataclass(frozen=True)
class Grant:
    """A successful token endpoint answer (RFC 6749 §5.1)."""

    access_token: str = field(repr=False)
    expires_at: float
    # A rotated refresh token (Microsoft rotates on every use), else None: keep the old one.
    refresh_token: str | None = field(default=None, repr=False)

    @property
    def access(self) -> AccessToken:
        return AccessToken(self.access_token, self.expires_at)


def needs_refresh(token: AccessToken | None, now: float, margin: float = REFRESH_MARGIN) -> bool:
    return token is None or token.remaining(now) < margin


def expiry_from(expires_in: object, now: float | None = None) -> float:
    """``expires_in`` (seconds, sometimes sent as a string) → epoch; one hour if absent.

    RFC 6749 §5.1 makes ``expires_in`` only RECOMMENDED; an hour is what Microsoft and
    Google issue, and an unknown lifetime must not mean "valid forever".
    """
    now = time.time() if now is None else now
    try:
        seconds = float(expires_in) if expires_in is not None else 3600.0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = 3600.0
    return now + max(0.0, seconds)


def _safe_description(text: object) -> str:
    # Error descriptions (AADSTS codes, Google's text) help the operator; keep one short line.
    if not isinstance(text, str):
        return ""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:200]


def grant_error(error: object, description: object, address: str) -> TokenError:
    """An RFC 6749 §5.2 error answer → the right TokenError."""
    code = error if isinstance(error, str) and error else "unknown_error"
    detail = _safe_description(description)
    said = f"token endpoint refused: {code}" + (f" ({detail})" if detail else "")
    if code in REFUSING_ERRORS:
        if code == "invalid_grant":
            hint = f"consent expired or revoked; run `relayd auth {address}`"
        else:
            hint = "the OAuth app registration (client id, secret or certificate) was refused"
        return ConsentRequired(f"{said}; {hint}", error=code)
    return TokenEndpointUnavailable(said)


class TokenSource(Protocol):
    """The one question the upstream asks (SMTP now, IMAP for the Sent copy later)."""

    async def access_token(self, account: AccountConfig) -> AccessToken: ...

    def rejected(self, account: AccountConfig, token: AccessToken) -> None:
        """The server refused this token: the next ``access_token`` must not return it."""
