"""A local HTTPS OAuth2 authorization server for the mail world.

It speaks just enough of Microsoft's identity platform (``/{tenant}/v2.0/.well-known/
openid-configuration``, ``/{tenant}/oauth2/v2.0/token|devicecode|authorize``) for msal, of
Google's (``/token``, ``/authorize``) for google-auth and google-auth-oauthlib, and of RFC 7662
token introspection (``/introspect``) for Dovecot's oauth2 passdb. Tokens are random strings
it remembers, so Dovecot's verdict on a token is the server's.

The authorization endpoint signs the user in: for clients registered with ``consent_page``
it shows a login/consent page (choose the identity, allow or deny) that a real browser fills
in, otherwise it consents at once as ``consent_user`` or the login hint. Codes are bound to
the client, the redirect URI and the PKCE challenge (RFC 7636 §4.6: a code issued with a
challenge is redeemed only with its verifier); with ``openid`` in the scope the token
endpoint adds an ID token with Microsoft's (``preferred_username``, ``tid``) or Google's
(``email``, ``email_verified``) claims, as the path the browser came by says.

Tests steer it: register clients, seed refresh tokens, revoke them (``invalid_grant``), make
the token endpoint answer 503 or go down, hold refreshes until released, choose the size and
lifetime of issued access tokens, approve a device code as the user would, and count requests
per grant type ("exactly one refresh").
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import html
import json
import secrets
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

from .pki import Pki

__all__ = ["DEVICE_GRANT", "JWT_GRANT", "OAuthServer"]

HOST = "127.0.0.1"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"


@dataclass
class _Issued:
    """An access token the server issued."""

    username: str | None  # a mailbox (delegated); None for an app token
    client_id: str
    expires_at: float
    app_domain: str | None = None  # app-only: every mailbox of this domain
    scope: str = ""  # as asked for (RFC 6749 §3.3), space-separated


@dataclass
class _RefreshGrant:
    username: str
    client_id: str
    revoked: bool = False
    scope: str = ""  # what was consented to ("" when seeded by a test: anything)


@dataclass
class _DeviceCode:
    user_code: str
    client_id: str
    expires_at: float
    scope: str = ""
    username: str | None = None  # set when approved


@dataclass
class _Code:
    """An authorization code and what it was issued for."""

    username: str
    client_id: str
    redirect_uri: str
    challenge: str | None  # RFC 7636 code_challenge (S256)
    nonce: str | None
    scope: str
    style: str  # "microsoft" or "google": which ID token claims


@dataclass
class _State:
    clients: dict[str, str | None] = field(default_factory=dict)  # id -> secret
    consent_page: set[str] = field(default_factory=set)  # clients shown the login page
    app_domains: dict[str, str] = field(default_factory=dict)  # app client id -> domain
    access: dict[str, _Issued] = field(default_factory=dict)
    refresh: dict[str, _RefreshGrant] = field(default_factory=dict)
    devices: dict[str, _DeviceCode] = field(default_factory=dict)  # device_code -> ...
    codes: dict[str, _Code] = field(default_factory=dict)
    code_refusals: Counter[str] = field(default_factory=Counter)  # why codes were refused
    counts: Counter[str] = field(default_factory=Counter)
    introspected: Counter[str] = field(default_factory=Counter)
    revoked_at_endpoint: list[str] = field(default_factory=list)  # via /revoke (RFC 7009)
    service_accounts: dict[str, bytes] = field(default_factory=dict)  # email -> public key PEM


class OAuthServer:
    """Start with :meth:`start`; :meth:`stop` closes the port (the endpoint is down)."""

    def __init__(self, pki: Pki, *, port: int = 0) -> None:
        self.pki = pki
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
        if port == 0:
            with socket.socket() as s:
                s.bind((HOST, 0))
                port = int(s.getsockname()[1])
        self.port = port
        self._lock = threading.Lock()
        self.state = _State()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        # Behaviour switches.
        self.fail_status: int | None = None  # token endpoint answers this (e.g. 503)
        self.token_size = 48  # characters of each issued access token
        self.token_lifetime = 3600  # seconds
        self.rotate_refresh_tokens = True  # Microsoft rotates on every use
        self.consent_user: str | None = None  # who signs in at /authorize
        self._jwt_key = secrets.token_bytes(32)
        self._gate = threading.Event()
        self._gate.set()
        self.held = 0  # refresh requests waiting at the gate

    # -- lifecycle ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}"

    def authority(self, tenant: str) -> str:
        return f"{self.url}/{tenant}"

    @property
    def google_token_url(self) -> str:
        return f"{self.url}/token"

    @property
    def google_auth_url(self) -> str:
        return f"{self.url}/authorize"

    @property
    def introspection_url(self) -> str:
        return f"{self.url}/introspect"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> None:
        if self._httpd is not None:
            return
        server = _Server((HOST, self.port), _Handler)
        server.oauth = self
        server.socket = self._ctx.wrap_socket(server.socket, server_side=True)
        self._httpd = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, self._httpd = self._httpd, None
        if server is None:
            return
        self._gate.set()
        server.shutdown()
        server.server_close()
        server.drop_connections()

    # -- test controls --------------------------------------------------------------------

    def add_client(
        self, client_id: str, secret: str | None = None, *, consent_page: bool = False
    ) -> None:
        """``consent_page``: /authorize shows the login/consent page to this client's users
        (and requires PKCE); else it consents at once."""
        with self._lock:
            self.state.clients[client_id] = secret
            if consent_page:
                self.state.consent_page.add(client_id)

    def add_app(self, client_id: str, secret: str, domain: str) -> None:
        """An app-only registration whose tokens may send as any mailbox of ``domain``."""
        with self._lock:
            self.state.clients[client_id] = secret
            self.state.app_domains[client_id] = domain

    def issue_refresh_token(self, username: str, client_id: str) -> str:
        token = "rt-" + secrets.token_urlsafe(24)
        with self._lock:
            self.state.refresh[token] = _RefreshGrant(username.lower(), client_id)
        return token

    def issue_access_token(
        self, username: str, client_id: str, *, lifetime: float | None = None, scope: str = ""
    ) -> str:
        with self._lock:
            return self._new_access(username.lower(), client_id, lifetime, scope)

    def revoke(self, refresh_token: str | None = None, *, username: str | None = None) -> None:
        """Revoke one refresh token, or every refresh token of ``username``."""
        with self._lock:
            for token, grant in self.state.refresh.items():
                if token == refresh_token or (username and grant.username == username.lower()):
                    grant.revoked = True

    def revocation(self, form: dict[str, str], basic: tuple[str, str] | None) -> int:
        """RFC 7009 §2.1: the client (when confidential, authenticated) revokes one of its
        tokens; §2.2: 200 also for a token that is already invalid."""
        client_id = basic[0] if basic else form.get("client_id", "")
        secret = basic[1] if basic else form.get("client_secret")
        with self._lock:
            self.state.counts["revoke"] += 1
            expected = self.state.clients.get(client_id, "")
            if client_id not in self.state.clients or (expected and expected != secret):
                return 401
            grant = self.state.refresh.get(form.get("token", ""))
            if grant is not None and grant.client_id == client_id:
                grant.revoked = True
                self.state.revoked_at_endpoint.append(form.get("token", ""))
            return 200

    @property
    def revoke_url(self) -> str:
        return f"{self.url}/revoke"

    def revoked_by_client(self) -> list[str]:
        """Refresh tokens revoked through /revoke, in order."""
        with self._lock:
            return list(self.state.revoked_at_endpoint)

    def count(self, grant_type: str) -> int:
        with self._lock:
            return self.state.counts[grant_type]

    def introspections(self, token: str) -> int:
        with self._lock:
            return self.state.introspected[token]

    def tokens_of(self, username: str) -> list[str]:
        with self._lock:
            return [t for t, i in self.state.access.items() if i.username == username.lower()]

    def hold_refreshes(self) -> None:
        self._gate.clear()

    def release_refreshes(self) -> None:
        self._gate.set()

    def approve_device_code(self, user_code: str, username: str) -> None:
        """What the user does on the verification page: enter the code and sign in."""
        with self._lock:
            for device in self.state.devices.values():
                if device.user_code == user_code:
                    device.username = username.lower()
                    return
        raise KeyError(f"no such user code: {user_code}")

    # -- token logic (called by the handler) --------------------------------------------

    def _new_access(
        self, username: str | None, client_id: str, lifetime: float | None, scope: str = ""
    ) -> str:
        prefix = "at-"
        size = max(self.token_size, len(prefix) + 8)
        token = prefix + secrets.token_urlsafe(size)[: size - len(prefix)]
        self.state.access[token] = _Issued(
            username=username,
            client_id=client_id,
            expires_at=time.time() + (self.token_lifetime if lifetime is None else lifetime),
            app_domain=self.state.app_domains.get(client_id) if username is None else None,
            scope=scope,
        )
        return token

    def _answer(
        self, username: str | None, client_id: str, refresh: bool, scope: str = ""
    ) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "token_type": "Bearer",
            "access_token": self._new_access(username, client_id, None, scope),
            "expires_in": self.token_lifetime,
        }
        if scope:
            doc["scope"] = scope
        if refresh and username is not None:
            token = "rt-" + secrets.token_urlsafe(24)
            self.state.refresh[token] = _RefreshGrant(username, client_id, scope=scope)
            doc["refresh_token"] = token
        return doc

    def token_request(self, form: dict[str, str], basic: tuple[str, str] | None) -> tuple[int, Any]:
        grant_type = form.get("grant_type", "")
        client_id = form.get("client_id") or (basic[0] if basic else "")
        secret = form.get("client_secret") or (basic[1] if basic else None)
        with self._lock:
            self.state.counts[grant_type] += 1
            if self.fail_status is not None:
                return self.fail_status, {"error": "temporarily_unavailable"}
            if grant_type == JWT_GRANT:
                # RFC 7523 §3: the signed assertion is the client's authentication.
                return self._jwt_grant(form)
            if client_id not in self.state.clients:
                return 400, {"error": "invalid_client", "error_description": "unknown client"}
            expected = self.state.clients[client_id]
            if expected is not None and grant_type != JWT_GRANT and secret != expected:
                return 401, {"error": "invalid_client", "error_description": "bad secret"}
        if grant_type == "refresh_token":
            self.held += 0 if self._gate.is_set() else 1
            self._gate.wait(60)
        with self._lock:
            return self._grant(grant_type, form, client_id)

    def _grant(self, grant_type: str, form: dict[str, str], client_id: str) -> tuple[int, Any]:
        if grant_type == "refresh_token":
            grant = self.state.refresh.get(form.get("refresh_token", ""))
            if grant is None or grant.revoked or grant.client_id != client_id:
                return 400, {
                    "error": "invalid_grant",
                    "error_description": "AADSTS70008: The refresh token has expired or "
                    "is revoked.",
                }
            scope = form.get("scope", grant.scope)
            return 200, self._answer(grant.username, client_id, self.rotate_refresh_tokens, scope)
        if grant_type == "client_credentials":
            if client_id not in self.state.app_domains:
                return 400, {"error": "unauthorized_client"}
            return 200, self._answer(None, client_id, False, form.get("scope", ""))
        if grant_type == DEVICE_GRANT:
            device = self.state.devices.get(form.get("device_code", ""))
            if device is None or device.expires_at < time.time():
                return 400, {"error": "expired_token"}
            if device.username is None:
                return 400, {"error": "authorization_pending"}  # RFC 8628 §3.5
            del self.state.devices[form["device_code"]]
            answer = self._answer(device.username, client_id, True, device.scope)
            if "openid" in device.scope.split():
                answer["id_token"] = self._id_token(device.username, client_id, "microsoft")
            return 200, answer
        if grant_type == "authorization_code":
            return self._redeem(form, client_id)
        if grant_type == JWT_GRANT:
            claims = _jwt_claims(form.get("assertion", ""))
            subject = claims.get("sub")
            if not isinstance(subject, str):
                return 400, {"error": "invalid_grant"}
            scope = str(claims.get("scope") or "")
            return 200, self._answer(subject.lower(), str(claims.get("iss")), False, scope)
        return 400, {"error": "unsupported_grant_type"}

    def add_service_account(self, client_email: str, public_key_pem: bytes) -> None:
        """A Google service account allowed domain-wide delegation (any subject)."""
        with self._lock:
            self.state.service_accounts[client_email] = public_key_pem

    def _jwt_grant(self, form: dict[str, str]) -> tuple[int, Any]:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, rsa

        assertion = form.get("assertion", "")
        claims = _jwt_claims(assertion)
        issuer, subject = claims.get("iss"), claims.get("sub")
        key_pem = self.state.service_accounts.get(str(issuer))
        if key_pem is None or not isinstance(subject, str):
            return 400, {"error": "invalid_grant", "error_description": "unknown service account"}
        signed, _, signature = assertion.rpartition(".")
        key = serialization.load_pem_public_key(key_pem)
        assert isinstance(key, rsa.RSAPublicKey)
        try:
            raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
            key.verify(raw, signed.encode(), padding.PKCS1v15(), hashes.SHA256())
        except (InvalidSignature, ValueError):
            return 400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}
        scope = str(claims.get("scope") or "")
        return 200, self._answer(subject.lower(), str(issuer), False, scope)

    def device_code(self, form: dict[str, str]) -> dict[str, Any]:
        with self._lock:
            self.state.counts["devicecode"] += 1
            device_code = secrets.token_urlsafe(24)
            user_code = "".join(secrets.choice("BCDFGHJKLMNPQRSTVWXZ") for _ in range(8))
            self.state.devices[device_code] = _DeviceCode(
                user_code=user_code,
                client_id=form.get("client_id", ""),
                expires_at=time.time() + 900,
                scope=form.get("scope", ""),
            )
        return {
            "device_code": device_code,
            "user_code": user_code,
            "verification_uri": f"{self.url}/devicelogin",
            "expires_in": 900,
            "interval": 1,
            "message": f"To sign in, open {self.url}/devicelogin and enter {user_code}.",
        }

    def _redeem(self, form: dict[str, str], client_id: str) -> tuple[int, Any]:
        """RFC 6749 §4.1.3 with RFC 7636 §4.6; a code is gone after one try, good or bad."""
        code = self.state.codes.pop(form.get("code", ""), None)
        refusal = None
        if code is None or code.client_id != client_id:
            refusal = "unknown code"
        elif form.get("redirect_uri", code.redirect_uri) != code.redirect_uri:
            refusal = "redirect_uri mismatch"
        elif code.challenge is not None:
            verifier = form.get("code_verifier")
            if not verifier:
                refusal = "code_verifier missing"
            elif not hmac.compare_digest(_s256(verifier), code.challenge):
                refusal = "code_verifier wrong"
        if refusal is not None or code is None:
            self.state.code_refusals[refusal or "unknown code"] += 1
            return 400, {"error": "invalid_grant", "error_description": f"PKCE/code: {refusal}"}
        answer = self._answer(code.username, client_id, True, code.scope)
        if "openid" in code.scope.split():
            answer["id_token"] = self._id_token(
                code.username, client_id, code.style, nonce=code.nonce
            )
        return 200, answer

    def _id_token(
        self, username: str, client_id: str, style: str, *, nonce: str | None = None
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": f"{self.url}/v2.0" if style == "microsoft" else self.url,
            "sub": hashlib.sha256(username.encode()).hexdigest()[:24],
            "aud": client_id,
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
        }
        if nonce:
            claims["nonce"] = nonce
        if style == "microsoft":
            claims.update(preferred_username=username, tid="contoso", name=username)
        else:
            claims.update(email=username, email_verified=True)
        header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = _b64url(json.dumps(claims).encode())
        signature = hmac.new(self._jwt_key, f"{header}.{payload}".encode(), "sha256").digest()
        return f"{header}.{payload}.{_b64url(signature)}"

    def _issue_code(self, user: str, query: dict[str, str], style: str) -> str:
        code = secrets.token_urlsafe(16)
        with self._lock:
            self.state.codes[code] = _Code(
                username=user.lower(),
                client_id=query.get("client_id", ""),
                redirect_uri=query.get("redirect_uri", ""),
                challenge=query.get("code_challenge")
                if query.get("code_challenge_method") == "S256"
                else None,
                nonce=query.get("nonce"),
                scope=query.get("scope", ""),
                style=style,
            )
        return code

    def authorize(self, query: dict[str, str], style: str = "google") -> str:
        """Auto-consent as ``consent_user`` (or the login hint): the redirect URL."""
        user = self.consent_user or query.get("login_hint", "")
        code = self._issue_code(user, query, style)
        answer = {"code": code, "state": query.get("state", "")}
        return query["redirect_uri"] + "?" + urlencode(answer)

    def shows_consent_page(self, query: dict[str, str]) -> bool:
        with self._lock:
            return query.get("client_id", "") in self.state.consent_page

    def consent_page(self, query: dict[str, str]) -> tuple[int, str]:
        """The login/consent page: who signs in, and allow or deny. Refuses an unknown
        client and, for these clients, a request without PKCE (RFC 9700 §2.1.1)."""
        with self._lock:
            known = query.get("client_id", "") in self.state.clients
        if not known or "redirect_uri" not in query:
            return 400, "<p>unknown client or no redirect_uri</p>"
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return 400, "<p>PKCE (S256) is required</p>"
        hidden = "".join(
            f'<input type=hidden name="{html.escape(k)}" value="{html.escape(v)}">'
            for k, v in query.items()
            if k != "login_hint"
        )
        hint = html.escape(query.get("login_hint", ""))
        scopes = "".join(f"<li>{html.escape(s)}</li>" for s in query.get("scope", "").split())
        return 200, (
            "<!doctype html><html><head><meta charset=utf-8><title>Sign in</title></head>"
            "<body><h1>Sign in to the test identity provider</h1>"
            f"<p>relayd asks for:</p><ul>{scopes}</ul>"
            f"<form method=post>{hidden}<p><label>Account <input id=username name=username "
            f'value="{hint}"></label></p>'
            "<p><button id=allow name=decision value=allow>Allow</button> "
            "<button id=deny name=decision value=deny>Deny</button></p></form></body></html>"
        )

    def consent_answer(self, form: dict[str, str], style: str) -> str:
        """The user's choice on the consent page → the redirect back (RFC 6749 §4.1.2)."""
        redirect = form["redirect_uri"]
        if form.get("decision") != "allow":
            answer = {"error": "access_denied", "state": form.get("state", "")}
        else:
            code = self._issue_code(form.get("username", ""), form, style)
            answer = {"code": code, "state": form.get("state", "")}
        return redirect + ("&" if "?" in redirect else "?") + urlencode(answer)

    def introspect(self, token: str) -> dict[str, Any]:
        # Dovecot 2.3 needs the username attribute present to report a plain authentication
        # failure; an inactive token therefore names nobody (RFC 7662 §2.2 allows extras).
        with self._lock:
            self.state.introspected[token] += 1
            issued = self.state.access.get(token)
            if issued is None or issued.expires_at < time.time():
                return {"active": False, "username": "-", "app_mailboxes": "-@invalid.invalid"}
            if issued.username is None:
                return {
                    "active": True,
                    "username": f"app:{issued.client_id}",
                    "app_mailboxes": f"*@{issued.app_domain}",
                    "scope": issued.scope,
                }
            return {
                "active": True,
                "username": issued.username,
                "app_mailboxes": "-@invalid.invalid",
                "scope": issued.scope,
            }

    def openid_configuration(self, tenant: str) -> dict[str, Any]:
        base = f"{self.url}/{tenant}"
        return {
            "issuer": f"{base}/v2.0",
            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
            "token_endpoint": f"{base}/oauth2/v2.0/token",
            "device_authorization_endpoint": f"{base}/oauth2/v2.0/devicecode",
        }

    def dovecot_passdbs(self, conf_dir: Path) -> str:
        """Dovecot passdb blocks (and their args files) validating tokens against this
        server: delegated tokens for their own user, app tokens for any user of their
        domain."""
        common = (
            "introspection_mode = post\n"
            f"introspection_url = {self.introspection_url}\n"
            f"tls_ca_cert_file = {self.pki.ca_cert}\n"
            "force_introspection = yes\n"
            "active_attribute = active\n"
            "active_value = true\n"
            "timeout_msecs = 10000\n"
        )
        user_conf = conf_dir / "oauth2-user.conf.ext"
        app_conf = conf_dir / "oauth2-app.conf.ext"
        user_conf.write_text(common + "username_attribute = username\nusername_format = %Lu\n")
        app_conf.write_text(common + "username_attribute = app_mailboxes\nusername_format = %Ld\n")
        return "".join(
            f"passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {p}\n}}\n"
            for p in (user_conf, app_conf)
        )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _s256(verifier: str) -> str:
    return _b64url(hashlib.sha256(verifier.encode("ascii")).digest())


def _jwt_claims(assertion: str) -> dict[str, Any]:
    with contextlib.suppress(ValueError, IndexError):
        payload = assertion.split(".")[1]
        doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        if isinstance(doc, dict):
            return doc
    return {}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    oauth: OAuthServer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        """A server that is down also breaks its kept-alive connections."""
        with self.connections_lock:
            live = list(self.connections)
        for conn in live:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        del format, args

    def _send(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _form(self) -> dict[str, str]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length).decode()
        return {k: v[0] for k, v in parse_qs(raw).items()}

    def _basic(self) -> tuple[str, str] | None:
        value = self.headers.get("Authorization", "")
        if not value.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(value[6:]).decode().partition(":")
        return user, password

    def do_GET(self) -> None:
        oauth = self.server.oauth
        url = urlparse(self.path)
        parts = [p for p in url.path.split("/") if p]
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        if parts[-3:] == ["v2.0", ".well-known", "openid-configuration"] and len(parts) == 4:
            self._send(200, oauth.openid_configuration(parts[0]))
        elif parts and parts[-1] == "authorize":
            style = "microsoft" if parts[-3:] == ["oauth2", "v2.0", "authorize"] else "google"
            if oauth.shows_consent_page(query):
                self._page(*oauth.consent_page(query))
                return
            self._redirect(oauth.authorize(query, style))
        else:
            self._send(404, {"error": "not_found"})

    def _redirect(self, location: str) -> None:
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _page(self, status: int, text: str) -> None:
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        oauth = self.server.oauth
        parts = [p for p in urlparse(self.path).path.split("/") if p]
        form = self._form()
        if parts == ["introspect"]:
            self._send(200, oauth.introspect(form.get("token", "")))
        elif parts and parts[-1] == "authorize" and "redirect_uri" in form:
            style = "microsoft" if parts[-3:] == ["oauth2", "v2.0", "authorize"] else "google"
            # 303: the browser follows the POST's answer with a GET (RFC 9110 §15.4.4).
            self.send_response(303)
            self.send_header("Location", oauth.consent_answer(form, style))
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif parts == ["token"] or parts[-3:] == ["oauth2", "v2.0", "token"]:
            status, doc = oauth.token_request(form, self._basic())
            # Like Microsoft's endpoint, a 5xx says when to come back (msal obeys Retry-After
            # and otherwise replays a 5xx from its cache for 60 s).
            self._send(status, doc, {"Retry-After": "1"} if status >= 500 else None)
        elif parts[-3:] == ["oauth2", "v2.0", "devicecode"]:
            self._send(200, oauth.device_code(form))
        elif parts == ["revoke"]:
            self._send(oauth.revocation(form, self._basic()), {})
        else:
            self._send(404, {"error": "not_found"})
