"""The authorization-code grant with PKCE for the web connect page (RFC 6749 §4.1, RFC 7636),
for Microsoft (delegated) and Google (installed-app / user) accounts.

``relayd auth`` goes through msal and google-auth-oauthlib, which keep the PKCE verifier,
``state`` and nonce inside their own flow objects; the web page must keep them in its
session between two requests, check them itself and check the ID token itself (msal stopped
validating ID tokens in 1.38). So this module speaks the protocol directly: the
authorization URL is built here, and the code is redeemed with the same token-request code
as the generic provider (``relayd.oauth.http``). What comes back is a ``ConsentResult``, the
record ``relayd auth`` stores, plus the ID token's claims for the identity check.

Microsoft's endpoints are ``{authority}/oauth2/v2.0/authorize|token`` (the paths msal reads
from the authority's openid-configuration); Google's are its published ones, or
``oauth.authority`` / ``oauth.token_url`` for a private deployment. The redirect URI
(``{public_url}/connect/callback``) must be registered with the app: Microsoft "Mobile and
desktop" or "Web" platform, Google a "Web application" client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from relayd.config.model import AccountConfig
from relayd.config.presets import PRESETS
from relayd.oauth.flows import GOOGLE_AUTH_URL, ConsentResult
from relayd.oauth.http import TokenHttpSession, token_document
from relayd.oauth.identity import id_token_claims
from relayd.oauth.pkce import METHOD, challenge_of
from relayd.oauth.tokens import ConsentRequired, expiry_from

__all__ = [
    "CodeFlow",
    "CodeGrant",
    "authorization_url",
    "code_flow_for",
    "redeem_code",
]

#: OpenID Connect scopes for the ID token (who signed in) and, for Microsoft, the refresh
#: token (``offline_access``; msal adds these itself, the protocol does not).
_MICROSOFT_OIDC = ("openid", "profile", "email", "offline_access")
_GOOGLE_OIDC = ("openid", "email")


@dataclass(frozen=True)
class CodeFlow:
    provider: str  # "Microsoft" or "Google": the page's button
    authorize_url: str
    token_url: str
    client_id: str
    scopes: tuple[str, ...]
    extra: tuple[tuple[str, str], ...] = ()  # more authorization request parameters


def code_flow_for(account: AccountConfig) -> CodeFlow | str:
    """The account's code flow, or why it has none (shown to the operator)."""
    oauth = account.oauth
    preset = PRESETS.get(account.provider)
    family = preset.oauth_family if preset is not None else "generic"
    if oauth is None or oauth.flow != "delegated" or not oauth.client_id:
        return "this account has no delegated OAuth sign-in"
    if family == "microsoft":
        if oauth.certificate is not None and oauth.client_secret is None:
            return (
                "a certificate-only app registration signs its requests with msal: "
                "use `relayd auth` for this account"
            )
        from relayd.oauth.microsoft import DELEGATED_SCOPES, microsoft_authority

        base = microsoft_authority(oauth).rstrip("/")
        return CodeFlow(
            provider="Microsoft",
            authorize_url=f"{base}/oauth2/v2.0/authorize",
            token_url=f"{base}/oauth2/v2.0/token",
            client_id=oauth.client_id,
            scopes=(*(oauth.scopes or DELEGATED_SCOPES), *_MICROSOFT_OIDC),
        )
    if family == "google":
        from relayd.oauth.google import GOOGLE_SCOPES, GOOGLE_TOKEN_URL

        return CodeFlow(
            provider="Google",
            authorize_url=oauth.authority or GOOGLE_AUTH_URL,
            token_url=oauth.token_url or GOOGLE_TOKEN_URL,
            client_id=oauth.client_id,
            scopes=(*(oauth.scopes or GOOGLE_SCOPES), *_GOOGLE_OIDC),
            # Google issues a refresh token only for offline access, and again only when
            # consent is asked anew (its "OAuth 2.0 for Web Server Applications").
            extra=(("access_type", "offline"), ("prompt", "consent")),
        )
    return f"provider {account.provider} has no sign-in page relayd knows"


def authorization_url(
    flow: CodeFlow, *, redirect_uri: str, state: str, verifier: str, nonce: str, login_hint: str
) -> str:
    """RFC 6749 §4.1.1 with RFC 7636 §4.3 ``code_challenge`` and the OIDC nonce."""
    params = {
        "response_type": "code",
        "client_id": flow.client_id,
        "redirect_uri": redirect_uri,
        "scope": " ".join(dict.fromkeys(flow.scopes)),
        "state": state,
        "code_challenge": challenge_of(verifier),
        "code_challenge_method": METHOD,
        "nonce": nonce,
        "login_hint": login_hint,
        **dict(flow.extra),
    }
    joiner = "&" if "?" in flow.authorize_url else "?"
    return flow.authorize_url + joiner + urlencode(params)


@dataclass(frozen=True)
class CodeGrant:
    consent: ConsentResult
    claims: dict[str, Any] | None = field(default=None, repr=False)


def redeem_code(
    flow: CodeFlow, account: AccountConfig, *, code: str, redirect_uri: str, verifier: str
) -> CodeGrant:
    """RFC 6749 §4.1.3 with the RFC 7636 §4.5 ``code_verifier``. Blocking (HTTP); raises
    TokenError (ConsentRequired when the code is refused)."""
    oauth = account.oauth
    assert oauth is not None
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect_uri,
        "client_id": flow.client_id,
        "code_verifier": verifier,
    }
    if oauth.client_secret is not None:
        form["client_secret"] = oauth.client_secret.reveal()
    with TokenHttpSession(oauth.ca_file) as session:
        doc, now = token_document(session, flow.token_url, form, account.address)
    access = doc.get("access_token")
    refresh = doc.get("refresh_token")
    if not isinstance(access, str) or not access:
        raise ConsentRequired("the provider answered without an access token", error="no_token")
    if not isinstance(refresh, str) or not refresh:
        raise ConsentRequired(
            "the provider returned no refresh token (is offline access allowed for the app?)",
            error="no_refresh_token",
        )
    claims = id_token_claims(doc.get("id_token"))
    return CodeGrant(
        consent=ConsentResult(
            refresh_token=refresh,
            access_token=access,
            expires_at=expiry_from(doc.get("expires_in"), now),
        ),
        claims=claims,
    )
