"""Any other OAuth2 provider: the RFC 6749 §6 refresh-token grant at ``token_url``.

The client authenticates with ``client_id`` / ``client_secret`` in the request body
(RFC 6749 §2.3.1 allows it; Google, Microsoft and most providers accept it), and ``scope``
is sent only when configured (§6: omitted means "the scope originally granted").
"""

from __future__ import annotations

from relayd.config.model import OAuthConfig
from relayd.oauth.http import TokenHttpSession, post_token_request
from relayd.oauth.tokens import ConsentRequired, Grant

__all__ = ["GenericRefresh"]


class GenericRefresh:
    stores_tokens = True

    def __init__(self, oauth: OAuthConfig, address: str) -> None:
        assert oauth.token_url is not None
        self.oauth = oauth
        self.address = address
        self.key = f"delegated:{address}"
        self.token_url = oauth.token_url

    def refresh(self, refresh_token: str | None) -> Grant:
        if refresh_token is None:
            raise ConsentRequired(
                f"no refresh token: set oauth.refresh_token or run `relayd auth {self.address}`",
                error="consent_required",
            )
        form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        if self.oauth.client_id:
            form["client_id"] = self.oauth.client_id
        if self.oauth.client_secret is not None:
            form["client_secret"] = self.oauth.client_secret.reveal()
        if self.oauth.scopes:
            form["scope"] = " ".join(self.oauth.scopes)
        with TokenHttpSession(self.oauth.ca_file) as session:
            return post_token_request(session, self.token_url, form, self.address)
