"""HTTPS to token endpoints: one session shape for msal, google-auth and the generic grant.

Two things the libraries get wrong by default for a daemon:

- ``requests`` lets ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` from the environment override a
  session's ``verify``: a configured ``oauth.ca_file`` would be silently ignored. Passing
  ``verify`` with every request wins over the environment, so this session does that.
- no timeout: a token endpoint that accepts the connection and never answers would hang a
  worker thread forever. Every request gets one.

Blocking: call from a worker thread (``asyncio.to_thread``), never on the event loop.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import requests

from relayd.oauth.tokens import (
    Grant,
    TokenEndpointUnavailable,
    TokenError,
    expiry_from,
    grant_error,
)

__all__ = [
    "TOKEN_TIMEOUT",
    "TokenHttpSession",
    "describe_network_error",
    "post_token_request",
    "token_document",
]

#: Seconds for one token endpoint request (connect + answer).
TOKEN_TIMEOUT = 30.0


class TokenHttpSession(requests.Session):
    def __init__(self, ca_file: Path | None = None, timeout: float = TOKEN_TIMEOUT) -> None:
        super().__init__()
        self._verify: str | bool = str(ca_file) if ca_file is not None else True
        self._timeout = timeout

    @property
    def verify_target(self) -> str | bool:
        """What to pass as ``verify`` to code that builds its own requests."""
        return self._verify

    def request(
        self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:
        if kwargs.get("verify") in (None, True):
            kwargs["verify"] = self._verify
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._timeout
        return super().request(method, url, *args, **kwargs)


def describe_network_error(exc: BaseException) -> str:
    """A short, secret-free description of why the endpoint could not be reached."""
    if isinstance(exc, requests.Timeout):
        return "token endpoint timed out"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS to the token endpoint failed (certificate not trusted?)"
    if isinstance(exc, requests.ConnectionError):
        return "token endpoint unreachable (connection failed)"
    return f"token endpoint request failed ({type(exc).__name__})"


def post_token_request(
    session: requests.Session, url: str, form: dict[str, str], address: str
) -> Grant:
    """POST an RFC 6749 token request (§6 refresh, §4.4 client credentials) and read §5."""
    doc, now = token_document(session, url, form, address)
    return grant_from(doc, now)


def token_document(
    session: requests.Session, url: str, form: dict[str, str], address: str
) -> tuple[dict[str, Any], float]:
    """POST a token request; the successful answer (RFC 6749 §5.1) and when it was asked.
    An error answer (§5.2) raises the matching TokenError; 5xx and garbage are
    TokenEndpointUnavailable."""
    now = time.time()
    try:
        resp = session.post(url, data=form, headers={"Accept": "application/json"})
    except requests.RequestException as exc:
        raise TokenEndpointUnavailable(describe_network_error(exc)) from None
    try:
        doc = json.loads(resp.text)
    except ValueError:
        doc = None
    if resp.status_code >= 500 or not isinstance(doc, dict):
        raise TokenEndpointUnavailable(f"token endpoint answered HTTP {resp.status_code}")
    if resp.status_code != 200 or "error" in doc:
        raise grant_error(doc.get("error"), doc.get("error_description"), address)
    return doc, now


def grant_from(doc: dict[str, Any], now: float) -> Grant:
    token = doc.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenEndpointUnavailable("token endpoint answered without an access token")
    refresh = doc.get("refresh_token")
    return Grant(
        access_token=token,
        expires_at=expiry_from(doc.get("expires_in"), now),
        refresh_token=refresh if isinstance(refresh, str) and refresh else None,
    )


def error_of(result: dict[str, Any], address: str) -> TokenError:
    return grant_error(result.get("error"), result.get("error_description"), address)
