"""The web sign-in of an OAuth account, as pure rules: what relayd remembers between sending
the browser to the provider and its return, and what it accepts when it returns.

- ``state`` (RFC 6749 §10.12) binds the answer to the browser session that asked: an answer
  whose state is not the one remembered is refused (a forged or replayed redirect, login
  CSRF), and so is an answer with no sign-in pending;
- the PKCE verifier (RFC 7636) is remembered here and nowhere else; a pending sign-in
  without a well-formed verifier is refused rather than redeemed without one;
- a pending sign-in expires (``SIGN_IN_SECONDS``): the code it leads to is short-lived too
  (RFC 6749 §4.1.2 recommends at most 10 minutes);
- the ID token (OpenID Connect Core §3.1.3.7) must be for relayd's client, unexpired and
  carry the nonce sent; its signature is not checked, since it comes straight from the
  token endpoint over verified TLS (§3.1.3.7, item 6);
- the identity signed in must be the account's address (or its login name): anyone else's
  tokens would send as them, so nothing is stored and the page says who signed in.
"""

from __future__ import annotations

import enum
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from relayd.config.model import AccountConfig
from relayd.oauth.identity import own_identity, signed_in_as
from relayd.oauth.pkce import is_verifier, new_verifier

__all__ = [
    "SIGN_IN_SECONDS",
    "CallbackRefusal",
    "Identity",
    "IdentityProblem",
    "PendingSignIn",
    "begin_sign_in",
    "check_callback",
    "check_identity",
]

SIGN_IN_SECONDS = 600.0
#: Clock skew allowed on ``exp`` (the provider's clock and ours).
CLOCK_SKEW = 120.0


@dataclass(frozen=True)
class PendingSignIn:
    account: str
    state: str = field(repr=False)
    verifier: str = field(repr=False)
    nonce: str = field(repr=False)
    started_at: float = 0.0

    def expired(self, now: float) -> bool:
        return now - self.started_at > SIGN_IN_SECONDS


def begin_sign_in(account: AccountConfig, now: float) -> PendingSignIn:
    return PendingSignIn(
        account=account.address,
        state=secrets.token_urlsafe(24),
        verifier=new_verifier(),
        nonce=secrets.token_urlsafe(16),
        started_at=now,
    )


class CallbackRefusal(enum.Enum):
    """Why an answer from the provider is not redeemed; the text is for the owner's page."""

    NOTHING_PENDING = "No sign-in was started from this page (or it was already finished)."
    STATE_MISMATCH = (
        "The sign-in answer does not belong to this page (its state does not match): it may "
        "have been forged or replayed."
    )
    EXPIRED = "The sign-in took too long."
    NO_VERIFIER = "The sign-in lost its PKCE verifier; it cannot be completed safely."
    NO_CODE = "The provider sent no authorization code."
    DENIED = "The provider did not grant access"


@dataclass(frozen=True)
class CallbackVerdict:
    code: str | None = field(default=None, repr=False)
    refusal: CallbackRefusal | None = None
    detail: str = ""  # the provider's error code, when it sent one

    @property
    def ok(self) -> bool:
        return self.refusal is None and self.code is not None


def check_callback(
    pending: PendingSignIn | None, query: Mapping[str, str], now: float
) -> CallbackVerdict:
    """The provider's redirect (RFC 6749 §4.1.2: ``code`` and ``state``, or §4.1.2.1:
    ``error``), judged against what this browser session started."""
    if pending is None:
        return CallbackVerdict(refusal=CallbackRefusal.NOTHING_PENDING)
    if not hmac.compare_digest(query.get("state", "").encode(), pending.state.encode()):
        return CallbackVerdict(refusal=CallbackRefusal.STATE_MISMATCH)
    if pending.expired(now):
        return CallbackVerdict(refusal=CallbackRefusal.EXPIRED)
    if not is_verifier(pending.verifier):
        return CallbackVerdict(refusal=CallbackRefusal.NO_VERIFIER)
    if "error" in query:
        error = "".join(c for c in query["error"][:64] if c.isalnum() or c in "_-.")
        return CallbackVerdict(refusal=CallbackRefusal.DENIED, detail=error)
    code = query.get("code", "")
    if not code:
        return CallbackVerdict(refusal=CallbackRefusal.NO_CODE)
    return CallbackVerdict(code=code)


# -- the identity in the ID token --------------------------------------------------------------


class IdentityProblem(enum.Enum):
    NO_ID_TOKEN = "The provider sent no ID token, so relayd cannot tell who signed in."
    WRONG_AUDIENCE = "The ID token was issued to another application."
    EXPIRED = "The ID token has expired."
    NONCE_MISMATCH = "The ID token does not answer this sign-in (nonce mismatch)."
    UNVERIFIED_EMAIL = "The provider says the signed-in address is not verified."
    NO_IDENTITY = "The ID token names no address."
    OTHER_IDENTITY = "You signed in as another mailbox."


@dataclass(frozen=True)
class Identity:
    """Who signed in (``who``: the first address-like claim) and whether that may be
    stored for the account (``problem`` None)."""

    who: str | None
    problem: IdentityProblem | None


def check_identity(
    claims: Mapping[str, Any] | None,
    account: AccountConfig,
    *,
    client_id: str,
    nonce: str,
    now: float,
) -> Identity:
    if claims is None:
        return Identity(None, IdentityProblem.NO_ID_TOKEN)
    names = signed_in_as(claims)
    who = names[0] if names else None
    audience = claims.get("aud")
    audiences = audience if isinstance(audience, list) else [audience]
    if client_id not in audiences:
        return Identity(who, IdentityProblem.WRONG_AUDIENCE)
    expiry = claims.get("exp")
    if not isinstance(expiry, (int, float)) or expiry + CLOCK_SKEW < now:
        return Identity(who, IdentityProblem.EXPIRED)
    if not hmac.compare_digest(str(claims.get("nonce", "")).encode(), nonce.encode()):
        return Identity(who, IdentityProblem.NONCE_MISMATCH)
    if claims.get("email_verified") is False:
        return Identity(who, IdentityProblem.UNVERIFIED_EMAIL)
    if who is None:
        return Identity(None, IdentityProblem.NO_IDENTITY)
    own = own_identity(names, account)
    if own is not None:
        return Identity(own, None)
    return Identity(who, IdentityProblem.OTHER_IDENTITY)
