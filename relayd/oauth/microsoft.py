"""Microsoft identity platform through msal: delegated refresh and app-only client credentials.

Imported only when an account uses it (msal and requests cost ~20 MB). Everything here blocks:
the registry runs it in a worker thread.

msal facts this module is built around (checked against msal 1.3x):
- constructing an application performs authority discovery over the network and raises when
  the authority is down: the application is built lazily, on the first refresh, and a failure
  there is "endpoint unavailable" (defer), not a broken account;
- its silent cache hands out access tokens until 5 minutes before expiry, while relayd wants
  10: refreshes are explicit (refresh-token grant; a fresh cache for client credentials,
  since ``acquire_token_for_client`` refuses ``force_refresh``);
- ``offline_access`` / ``openid`` / ``profile`` must not be passed (msal adds them);
- a private or test authority needs ``validate_authority=False, instance_discovery=False``.
"""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import urlparse

import msal
import requests

from relayd.config.model import OAuthConfig
from relayd.oauth.http import TokenHttpSession, describe_network_error, error_of, grant_from
from relayd.oauth.tokens import ConsentRequired, Grant, TokenEndpointUnavailable, TokenError

__all__ = [
    "APP_ONLY_SCOPES",
    "DELEGATED_SCOPES",
    "MicrosoftAppOnly",
    "MicrosoftDelegated",
    "build_application",
    "microsoft_authority",
]

#: SMTP submission and IMAP (Sent copy) in one token: both belong to outlook.office.com.
DELEGATED_SCOPES = (
    "https://outlook.office.com/SMTP.Send",
    "https://outlook.office.com/IMAP.AccessAsUser.All",
)
#: App-only (SMTP.SendAsApp / IMAP.AccessAsApp are granted to the app; .default asks for them).
APP_ONLY_SCOPES = ("https://outlook.office365.com/.default",)

_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:RSA |EC |ENCRYPTED )?PRIVATE KEY-----.+?-----END (?:RSA |EC |ENCRYPTED )?"
    r"PRIVATE KEY-----",
    re.DOTALL,
)


def microsoft_authority(oauth: OAuthConfig) -> str:
    return oauth.authority or f"https://login.microsoftonline.com/{oauth.tenant_id}"


def _client_credential(oauth: OAuthConfig) -> str | dict[str, str] | None:
    if oauth.client_secret is not None:
        return oauth.client_secret.reveal()
    if oauth.certificate is not None and oauth.thumbprint is not None:
        pem = oauth.certificate.reveal()
        match = _PRIVATE_KEY.search(pem)
        return {"private_key": match.group(0) if match else pem, "thumbprint": oauth.thumbprint}
    return None


def build_application(oauth: OAuthConfig, *, confidential: bool | None = None) -> Any:
    """A msal application for this registration (network: authority discovery).

    ``confidential`` None: confidential when the registration has a secret or certificate.
    """
    authority = microsoft_authority(oauth)
    credential = _client_credential(oauth)
    if confidential is None:
        confidential = credential is not None
    host = (urlparse(authority).hostname or "").lower()
    well_known = host in msal.authority.WELL_KNOWN_AUTHORITY_HOSTS
    options: dict[str, Any] = {
        "authority": authority,
        "http_client": TokenHttpSession(oauth.ca_file),
        # National clouds are known to msal; anything else (a private deployment, the test
        # suite's server) cannot be validated against Microsoft's instance list.
        "validate_authority": well_known,
        "instance_discovery": well_known,
    }
    try:
        if confidential:
            return msal.ConfidentialClientApplication(
                oauth.client_id, client_credential=credential, **options
            )
        return msal.PublicClientApplication(oauth.client_id, **options)
    except (requests.RequestException, ValueError, msal.exceptions.MsalError) as exc:
        raise TokenEndpointUnavailable(_discovery_problem(exc)) from None


def _discovery_problem(exc: BaseException) -> str:
    if isinstance(exc, requests.RequestException):
        return "authority discovery failed: " + describe_network_error(exc)
    return "authority discovery failed (openid-configuration unavailable)"


def _call(function: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run a msal call, mapping transport failures (msal raises on 5xx) to "unavailable"."""
    try:
        result = function(*args, **kwargs)
    except TokenError:
        raise
    except requests.RequestException as exc:
        raise TokenEndpointUnavailable(describe_network_error(exc)) from None
    except Exception as exc:  # msal raises MsalServiceError, ValueError... on 5xx/garbage
        raise TokenEndpointUnavailable(
            f"token endpoint request failed ({type(exc).__name__})"
        ) from None
    if not isinstance(result, dict):
        raise TokenEndpointUnavailable("token endpoint gave no answer")
    return result


def result_to_grant(result: dict[str, Any], address: str, now: float) -> Grant:
    if "error" in result:
        raise error_of(result, address)
    return grant_from(result, now)


class MicrosoftDelegated:
    """A mailbox that consented (``relayd auth``): refresh-token grant, rotated every use."""

    stores_tokens = True

    def __init__(self, oauth: OAuthConfig, address: str) -> None:
        self.oauth = oauth
        self.address = address
        self.key = f"delegated:{address}"
        self.scopes = list(oauth.scopes or DELEGATED_SCOPES)
        self._app: Any = None

    def refresh(self, refresh_token: str | None) -> Grant:
        if refresh_token is None:
            raise ConsentRequired(
                f"no OAuth consent stored; run `relayd auth {self.address}`",
                error="consent_required",
            )
        if self._app is None:
            self._app = build_application(self.oauth)
        now = time.time()
        # The migration API is the one msal call that refreshes on demand with a refresh token
        # relayd keeps itself (encrypted, rotated atomically) instead of msal's own cache.
        result = _call(self._app.acquire_token_by_refresh_token, refresh_token, self.scopes)
        return result_to_grant(result, self.address, now)


class MicrosoftAppOnly:
    """Tenant-wide app (client credentials): one token for every mailbox it may send as."""

    stores_tokens = False

    def __init__(self, oauth: OAuthConfig, address: str) -> None:
        self.oauth = oauth
        self.address = address
        self.key = f"app:{microsoft_authority(oauth)}:{oauth.client_id}"
        self.scopes = list(oauth.scopes or APP_ONLY_SCOPES)
        self._app: Any = None

    def refresh(self, refresh_token: str | None) -> Grant:
        del refresh_token  # RFC 6749 §4.4: no refresh token; the app asks again
        if self._app is None:
            self._app = build_application(self.oauth, confidential=True)
        # A fresh cache: msal would hand back its cached token (valid < 10 min) otherwise.
        self._app.token_cache = msal.TokenCache()
        now = time.time()
        result = _call(self._app.acquire_token_for_client, self.scopes)
        return result_to_grant(result, self.address, now)
