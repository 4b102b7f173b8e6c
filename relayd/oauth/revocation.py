"""Revoking a refresh token at the provider (RFC 7009), for ``relayd auth --revoke``.

Google has a revocation endpoint; Microsoft's identity platform has none for a single
refresh token (an admin revokes every session of the user instead, Graph
``revokeSignInSessions``). A generic provider may name its endpoint in ``oauth.revoke_url``.
Blocking, like the other token endpoint requests.
"""

from __future__ import annotations

import requests

from relayd.config.model import OAuthConfig
from relayd.config.presets import PRESETS
from relayd.oauth.http import TokenHttpSession, describe_network_error

__all__ = ["GOOGLE_REVOKE_URL", "revocation_url", "revoke_refresh_token"]

GOOGLE_REVOKE_URL = "https://oauth2.googleapis.com/revoke"


def revocation_url(provider: str, oauth: OAuthConfig) -> str | None:
    """Where the provider revokes a refresh token; None if it cannot (Microsoft)."""
    if oauth.revoke_url is not None:
        return oauth.revoke_url
    preset = PRESETS.get(provider)
    if preset is not None and preset.oauth_family == "google":
        return GOOGLE_REVOKE_URL
    return None


def revoke_refresh_token(oauth: OAuthConfig, url: str, refresh_token: str) -> str | None:
    """POST the revocation; None when done, else why not (secret-free).

    RFC 7009 §2.2: the endpoint answers 200 for a token it revoked and for one that was
    invalid already, so both count as revoked. A confidential client authenticates
    (§2.1) with its secret in the body, as its token requests do."""
    form = {"token": refresh_token, "token_type_hint": "refresh_token"}
    if oauth.client_id:
        form["client_id"] = oauth.client_id
    if oauth.client_secret is not None:
        form["client_secret"] = oauth.client_secret.reveal()
    with TokenHttpSession(oauth.ca_file) as session:
        try:
            resp = session.post(url, data=form, headers={"Accept": "application/json"})
        except requests.RequestException as exc:
            return describe_network_error(exc).replace("token endpoint", "revocation endpoint")
    if resp.status_code == 200:
        return None
    # Google answers 400 invalid_token for a token it no longer knows: revoked all the same.
    if resp.status_code == 400 and "invalid_token" in resp.text:
        return None
    return f"the revocation endpoint answered HTTP {resp.status_code}"
