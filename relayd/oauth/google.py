"""Google through google-auth: user refresh tokens and service accounts (domain-wide delegation).

Imported only when an account uses it. Blocking: the registry runs it in a worker thread.
google-auth would refresh 3 min 45 s before expiry on its own; relayd calls ``refresh()``
itself when less than 10 minutes remain. google-auth retries 5xx answers a few times before
raising a *retryable* ``RefreshError``: that, and its ``TransportError``, mean "defer".
"""

from __future__ import annotations

import calendar
import json
import time
from typing import Any

import google.auth.exceptions
import google.auth.transport.requests
import google.oauth2.credentials
import google.oauth2.service_account

from relayd.config.model import OAuthConfig
from relayd.oauth.http import TokenHttpSession
from relayd.oauth.tokens import (
    ConsentRequired,
    Grant,
    TokenEndpointUnavailable,
    TokenError,
    expiry_from,
    grant_error,
)

__all__ = ["GOOGLE_SCOPES", "GOOGLE_TOKEN_URL", "GoogleServiceAccount", "GoogleUser"]

#: The one scope Gmail's SMTP and IMAP accept (Google's device flow does not allow it).
GOOGLE_SCOPES = ("https://mail.google.com/",)
GOOGLE_TOKEN_URL = "https://oauth2.googleapis.com/token"

# google-auth's constructors are untyped; these aliases keep that at the boundary.
_UserCredentials: Any = google.oauth2.credentials.Credentials
_ServiceAccountCredentials: Any = google.oauth2.service_account.Credentials


def _expiry(credentials: Any, now: float) -> float:
    expiry = getattr(credentials, "expiry", None)
    if expiry is None:
        return expiry_from(None, now)
    # google-auth keeps a naive UTC datetime.
    return float(calendar.timegm(expiry.utctimetuple()))


def _refresh(credentials: Any, ca_file: Any, address: str) -> None:
    request = google.auth.transport.requests.Request(session=TokenHttpSession(ca_file))
    try:
        credentials.refresh(request)
    except google.auth.exceptions.TransportError:
        raise TokenEndpointUnavailable("token endpoint unreachable (connection failed)") from None
    except google.auth.exceptions.RefreshError as exc:
        raise _refresh_problem(exc, address) from None


def _refresh_problem(exc: google.auth.exceptions.RefreshError, address: str) -> TokenError:
    if getattr(exc, "retryable", False):
        return TokenEndpointUnavailable("token endpoint failed temporarily (HTTP 5xx)")
    data = exc.args[1] if len(exc.args) > 1 else None
    if isinstance(data, dict) and "error" in data:
        return grant_error(data.get("error"), data.get("error_description"), address)
    return TokenEndpointUnavailable("token endpoint gave an unusable answer")


class GoogleUser:
    """A Gmail / Workspace user who consented (``relayd auth``): refresh-token grant."""

    stores_tokens = True

    def __init__(self, oauth: OAuthConfig, address: str) -> None:
        self.oauth = oauth
        self.address = address
        self.key = f"delegated:{address}"
        self.scopes = list(oauth.scopes or GOOGLE_SCOPES)

    def refresh(self, refresh_token: str | None) -> Grant:
        if refresh_token is None:
            raise ConsentRequired(
                f"no OAuth consent stored; run `relayd auth {self.address}`",
                error="consent_required",
            )
        secret = self.oauth.client_secret.reveal() if self.oauth.client_secret else None
        credentials = _UserCredentials(
            token=None,
            refresh_token=refresh_token,
            token_uri=self.oauth.token_url or GOOGLE_TOKEN_URL,
            client_id=self.oauth.client_id,
            client_secret=secret,
            scopes=self.scopes,
        )
        now = time.time()
        _refresh(credentials, self.oauth.ca_file, self.address)
        return Grant(
            access_token=credentials.token,
            expires_at=_expiry(credentials, now),
            refresh_token=credentials.refresh_token,
        )


class GoogleServiceAccount:
    """Domain-wide delegation: the service account acts as the sender (``subject``)."""

    stores_tokens = False

    def __init__(self, oauth: OAuthConfig, address: str) -> None:
        assert oauth.service_account_key is not None
        self.oauth = oauth
        self.address = address
        info = json.loads(oauth.service_account_key.reveal())
        if oauth.token_url:
            info["token_uri"] = oauth.token_url
        self._info = info
        # One token per impersonated mailbox: a delegated token names its subject.
        self.key = f"service-account:{info.get('client_email')}:{address}"
        self.scopes = list(oauth.scopes or GOOGLE_SCOPES)

    def refresh(self, refresh_token: str | None) -> Grant:
        del refresh_token  # RFC 7523 JWT bearer grant: a signed assertion each time
        try:
            credentials = _ServiceAccountCredentials.from_service_account_info(
                self._info, scopes=self.scopes, subject=self.address
            )
        except (ValueError, KeyError):
            raise ConsentRequired(
                "the service-account key cannot be used (malformed key)", error="invalid_client"
            ) from None
        now = time.time()
        _refresh(credentials, self.oauth.ca_file, self.address)
        return Grant(access_token=credentials.token, expires_at=_expiry(credentials, now))
