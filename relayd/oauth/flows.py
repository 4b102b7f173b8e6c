"""Consent flows that obtain a refresh token from a human (``relayd auth``). Blocking.

- Microsoft device code (RFC 8628): shows a URL and a code, works over SSH with no browser;
  needs a public client (msal offers it on ``PublicClientApplication`` only).
- Microsoft browser with a loopback redirect (RFC 8252, with PKCE from msal), for public and
  confidential clients alike.
- Google installed-app flow (google-auth-oauthlib builds the URL with PKCE and redeems the
  code): the loopback redirect, or — on a machine with no browser — the redirected address
  pasted back, since Google's device flow does not allow the mail scope.
- Generic providers: a refresh token obtained elsewhere, pasted, checked by one refresh.
"""

from __future__ import annotations

import contextlib
import time
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relayd.config.model import OAuthConfig
from relayd.oauth.identity import id_token_claims, signed_in_as
from relayd.oauth.loopback import LoopbackRedirect, free_loopback_port, query_of
from relayd.oauth.tokens import ConsentRequired, TokenEndpointUnavailable, expiry_from

__all__ = [
    "ConsentResult",
    "generic_pasted_token",
    "google_installed_app",
    "microsoft_browser",
    "microsoft_device_code",
]

Say = Callable[[str], None]
Ask = Callable[[str], str]

GOOGLE_AUTH_URL = "https://accounts.google.com/o/oauth2/auth"
#: OpenID Connect scopes for an ID token with the address (Google returns the email scope
#: under this name, so asking for it so keeps oauthlib's scope comparison quiet).
GOOGLE_IDENTITY_SCOPES = ("openid", "https://www.googleapis.com/auth/userinfo.email")
#: How long a browser consent may take before relayd gives up waiting.
BROWSER_TIMEOUT = 600.0


@dataclass(frozen=True)
class ConsentResult:
    refresh_token: str = field(repr=False)
    access_token: str = field(repr=False)
    expires_at: float
    # Who signed in, from the ID token (relayd.oauth.identity), when the provider sent one;
    # ``verified`` False when it says the address is not verified (Google's email_verified).
    identities: tuple[str, ...] = ()
    verified: bool = True


def _from_msal(result: dict[str, Any], address: str) -> ConsentResult:
    if "error" in result:
        from relayd.oauth.http import error_of

        raise error_of(result, address)
    if not result.get("refresh_token"):
        raise ConsentRequired(
            "the provider returned no refresh token (is offline access allowed for the app?)",
            error="no_refresh_token",
        )
    # msal decodes the ID token of the token endpoint's answer into id_token_claims.
    claims = result.get("id_token_claims") or {}
    return ConsentResult(
        refresh_token=result["refresh_token"],
        access_token=result.get("access_token", ""),
        expires_at=expiry_from(result.get("expires_in")),
        identities=tuple(signed_in_as(claims)),
    )


def microsoft_device_code(oauth: OAuthConfig, address: str, say: Say) -> ConsentResult:
    from relayd.oauth.microsoft import DELEGATED_SCOPES, build_application

    if oauth.client_secret is not None or oauth.certificate is not None:
        raise ConsentRequired(
            "the device-code flow needs a public client (no client_secret); use --browser",
            error="unsupported",
        )
    app = build_application(oauth, confidential=False)
    scopes = list(oauth.scopes or DELEGATED_SCOPES)
    flow = app.initiate_device_flow(scopes=scopes)
    if "user_code" not in flow:
        raise TokenEndpointUnavailable(
            "the device authorization endpoint did not give a code: "
            + str(flow.get("error", "unknown error"))
        )
    uri = flow.get("verification_uri") or flow.get("verification_url")
    minutes = max(1, int(flow.get("expires_in", 900)) // 60)
    say(
        f"\nTo let relayd send as {address}, open this address on any device:\n\n"
        f"    {uri}\n\n"
        f"and enter the code:\n\n"
        f"    {flow['user_code']}\n\n"
        f"Sign in as {address}. Waiting for approval (the code expires in {minutes} min)..."
    )
    # msal polls the token endpoint at the server's interval (RFC 8628 §3.4, slow_down §3.5).
    return _from_msal(app.acquire_token_by_device_flow(flow), address)


def _open_browser(url: str, say: Say, port: int) -> None:
    say(
        f"\nOpen this address in a browser and sign in:\n\n    {url}\n\n"
        f"The browser returns to http://localhost:{port}/ on this machine. Over SSH, "
        f"forward that port first (ssh -L {port}:localhost:{port} ...), or use "
        "--device-code (Microsoft) / --no-browser (Google)."
    )
    with contextlib.suppress(webbrowser.Error):
        webbrowser.open(url, new=1)


def microsoft_browser(
    oauth: OAuthConfig, address: str, say: Say, *, open_browser: bool = True
) -> ConsentResult:
    from relayd.oauth.microsoft import DELEGATED_SCOPES, build_application

    app = build_application(oauth)
    scopes = list(oauth.scopes or DELEGATED_SCOPES)
    with LoopbackRedirect() as redirect:
        flow = app.initiate_auth_code_flow(
            scopes, redirect_uri=f"http://localhost:{redirect.port}", login_hint=address
        )
        if open_browser:
            _open_browser(flow["auth_uri"], say, redirect.port)
        else:
            say(
                f"\nOpen this address in a browser and sign in as {address}:\n\n"
                f"    {flow['auth_uri']}\n"
            )
        answer = redirect.wait(BROWSER_TIMEOUT)
    if answer is None:
        raise ConsentRequired("no answer from the browser in time", error="timeout")
    return _from_msal(app.acquire_token_by_auth_code_flow(flow, answer), address)


def google_installed_app(
    oauth: OAuthConfig, address: str, say: Say, ask: Ask, *, paste: bool
) -> ConsentResult:
    from google_auth_oauthlib.flow import Flow

    from relayd.oauth.google import GOOGLE_SCOPES, GOOGLE_TOKEN_URL
    from relayd.oauth.http import TokenHttpSession

    assert oauth.client_secret is not None
    client = {
        "installed": {
            "client_id": oauth.client_id,
            "client_secret": oauth.client_secret.reveal(),
            # `authority` names the authorization endpoint of a private deployment (and of
            # the test suite's server); `token_url` the token endpoint.
            "auth_uri": oauth.authority or GOOGLE_AUTH_URL,
            "token_uri": oauth.token_url or GOOGLE_TOKEN_URL,
        }
    }
    # openid and the email scope add an ID token naming who signed in, checked against the
    # account before anything is stored; the refresh asks for the mail scope alone.
    scopes = list(dict.fromkeys([*(oauth.scopes or GOOGLE_SCOPES), *GOOGLE_IDENTITY_SCOPES]))
    flow = Flow.from_client_config(client, scopes=scopes)
    session = TokenHttpSession(oauth.ca_file)
    # offline + consent: Google issues a refresh token only then (and again on re-consent).
    extra = {"access_type": "offline", "prompt": "consent", "login_hint": address}
    if paste:
        flow.redirect_uri = f"http://127.0.0.1:{free_loopback_port()}/"
        url, _ = flow.authorization_url(**extra)
        say(
            f"\nOpen this address in a browser on any machine and sign in as {address}:\n\n"
            f"    {url}\n\n"
            "After you allow access, the browser goes to a page on 127.0.0.1 that does not "
            "load. Copy that page's full address from the address bar and paste it here."
        )
        answer = ask("Address of the page the browser ended on: ")
    else:
        with LoopbackRedirect() as redirect:
            flow.redirect_uri = f"http://127.0.0.1:{redirect.port}/"
            url, _ = flow.authorization_url(**extra)
            _open_browser(url, say, redirect.port)
            query = redirect.wait(BROWSER_TIMEOUT)
        if query is None:
            raise ConsentRequired("no answer from the browser in time", error="timeout")
        answer = flow.redirect_uri + "?" + "&".join(f"{k}={v}" for k, v in query.items())
    query = query_of(answer)
    if "error" in query:
        raise ConsentRequired(f"consent not given: {query['error']}", error=query["error"])
    if "code" not in query:
        raise ConsentRequired("that address holds no authorization code", error="no_code")
    # oauthlib insists on https for the redirect it parses; the loopback one is http by design
    # (RFC 8252 §8.3), and only the code in it matters.
    token = flow.fetch_token(
        authorization_response=answer.strip().replace("http://", "https://", 1),
        verify=session.verify_target,
    )
    refresh = token.get("refresh_token")
    if not refresh:
        raise ConsentRequired("Google returned no refresh token", error="no_refresh_token")
    claims = id_token_claims(token.get("id_token")) or {}
    return ConsentResult(
        refresh_token=refresh,
        access_token=token.get("access_token", ""),
        expires_at=float(token.get("expires_at") or expiry_from(token.get("expires_in"))),
        identities=tuple(signed_in_as(claims)),
        verified=claims.get("email_verified") is not False,
    )


def generic_pasted_token(oauth: OAuthConfig, address: str, ask: Ask) -> ConsentResult:
    from relayd.oauth.generic import GenericRefresh

    pasted = ask("Refresh token for this account (input hidden): ").strip()
    if not pasted:
        raise ConsentRequired("no refresh token given", error="no_refresh_token")
    # One refresh proves the token works and gives the first access token (and, with
    # rotating providers, the refresh token to keep).
    grant = GenericRefresh(oauth, address).refresh(pasted)
    return ConsentResult(
        refresh_token=grant.refresh_token or pasted,
        access_token=grant.access_token,
        expires_at=grant.expires_at or time.time(),
    )
