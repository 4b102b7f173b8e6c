"""The HTTP send-API transports: Microsoft Graph ``sendMail`` and Gmail ``messages.send``.

One ``Transport`` per connection slot of the account's lane, as for SMTP, so the lane's
``max_connections`` bounds the requests in flight for a mailbox (Graph allows 4 concurrent
requests per app and mailbox). The HTTP connections themselves come from one pooled
``aiohttp`` client per API (``ApiClients``), kept alive across messages; every request has a
timeout.

"Open" means holding an access token; each message is one POST of the spooled MIME, after
``relayd.core.apienvelope`` made its header recipients match the envelope. The answer is
mapped by ``relayd.core.httpapi``; a 401 drops the token, refreshes it once and sends once
more (RFC 6750 §3.1 ``invalid_token``). A timeout after the request was written may have
sent the message: deferred and sent again later, at least once as with SMTP.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote, urlsplit

import aiohttp

from relayd.config.model import AccountConfig, TransportKind
from relayd.config.presets import APP_ONLY_FLOWS
from relayd.core.apienvelope import reconcile
from relayd.core.httpapi import Api, ApiAnswer, Refreshed, map_answer, parse_error
from relayd.core.lines import as_delivered
from relayd.core.outcome import Failure, FailureKind, Phase
from relayd.tls import client_context
from relayd.upstream.credentials import Credential, CredentialSource
from relayd.upstream.dataphase import ContentSource
from relayd.upstream.transport import DEFAULT_TIMEOUTS, AttemptError, Timeouts, TransactionResult

__all__ = ["TIMEOUT_ENV", "ApiClients", "HttpApiTransport"]

log = logging.getLogger(__name__)

#: Test-only: seconds a send request may take in all (instead of the DATA timeout), so that
#: a test of an endpoint that never answers need not wait minutes. Never set in production.
TIMEOUT_ENV = "RELAYD_TEST_API_TIMEOUT"


def _request_timeout(timeouts: Timeouts) -> aiohttp.ClientTimeout:
    total = float(os.environ.get(TIMEOUT_ENV) or timeouts.data)
    return aiohttp.ClientTimeout(
        total=total, connect=timeouts.connect, sock_connect=timeouts.connect
    )


class ApiClients:
    """One pooled HTTP client per API endpoint and trust store, shared by every slot."""

    def __init__(self, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> None:
        self.timeouts = timeouts
        self._sessions: dict[tuple[str, str | None], aiohttp.ClientSession] = {}

    def session(self, base_url: str, ca_file: Path | None) -> aiohttp.ClientSession:
        key = (base_url, str(ca_file) if ca_file else None)
        session = self._sessions.get(key)
        if session is None or session.closed:
            ctx: ssl.SSLContext = client_context(key[1])
            connector = aiohttp.TCPConnector(ssl=ctx, keepalive_timeout=30.0)
            session = aiohttp.ClientSession(
                connector=connector,
                # Proxies and .netrc from the environment are not relayd's configuration.
                trust_env=False,
                auto_decompress=True,
            )
            self._sessions[key] = session
        return session

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()


_APIS = {TransportKind.GRAPH: Api.GRAPH, TransportKind.GMAIL_API: Api.GMAIL}


class HttpApiTransport:
    """A ``Transport`` over Graph ``sendMail`` or Gmail ``messages.send``."""

    def __init__(
        self,
        account: AccountConfig,
        *,
        credentials: CredentialSource,
        clients: ApiClients,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        assert account.transport.is_http_api and account.api_url and account.oauth
        self.account = account
        self.api = _APIS[account.transport]
        self.base_url = account.api_url
        self.credentials = credentials
        self.clients = clients
        self.timeouts = timeouts
        self.clock = clock
        self.app_only = account.oauth.flow in APP_ONLY_FLOWS
        self._credential: Credential | None = None

    @property
    def relay(self) -> str:
        parts = urlsplit(self.base_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"{parts.hostname}:{port}"

    @property
    def is_open(self) -> bool:
        return self._credential is not None

    async def open(self) -> None:
        self._credential = await self.credentials.obtain(self.account)

    async def probe(self) -> None:
        # Neither API has a call that checks Mail.Send / gmail.send without sending: the
        # probe is the token alone (a permission refusal is not probed, see AccountHealth).
        await self.credentials.obtain(self.account)

    async def quit(self) -> None:
        self._credential = None

    def close(self) -> None:
        self._credential = None

    def _request(self, mime: bytes) -> tuple[str, bytes, str]:
        """URL, body and Content-Type of the send request for ``mime``."""
        user = quote(self.account.address, safe="@")
        if self.api is Api.GRAPH:
            # Graph "Send mail" in MIME format: the body is the base64 of the MIME, as text.
            return (
                f"{self.base_url}/v1.0/users/{user}/sendMail",
                base64.b64encode(mime),
                "text/plain",
            )
        return (
            f"{self.base_url}/upload/gmail/v1/users/{user}/messages/send?uploadType=media",
            mime,
            "message/rfc822",
        )

    async def send(
        self,
        sender: str,
        recipients: tuple[str, ...],
        content: ContentSource,
        *,
        smtputf8: bool = False,
    ) -> TransactionResult:
        del sender, smtputf8  # the sender is the mailbox of the URL; the APIs take UTF-8
        mime = await asyncio.to_thread(lambda: as_delivered(b"".join(content.iter_content())))
        reconciled = reconcile(mime, recipients)
        logx = {"account": self.account.address}
        if reconciled.added_bcc:
            log.debug(
                "envelope-only recipients sent as Bcc: %d", len(reconciled.added_bcc), extra=logx
            )
        if reconciled.removed:
            log.info(
                "header recipients outside the envelope left out of the request: %s",
                ", ".join(reconciled.removed),
                extra=logx,
            )
        url, body, content_type = self._request(reconciled.content)
        refreshed = Refreshed.NOT_YET
        while True:
            # Every request carries a bearer token, unlike an SMTP session that logged in
            # once: ask for it each time (the registry hands out its cached token, refreshed
            # 10 minutes before expiry), so a slot kept busy for hours never sends a stale one.
            await self.open()
            assert self._credential is not None
            answer = await self._post(url, body, content_type, self._credential)
            outcome = map_answer(
                self.api, answer, now=self.clock(), refreshed=refreshed, app_only=self.app_only
            )
            if outcome is None:
                # 401: this token is no good; a fresh one, then this request once more.
                log.info("%s refused the access token; refreshing once", self.api.value, extra=logx)
                self.credentials.rejected(self.account, self._credential)
                self._credential = None
                refreshed = Refreshed.ALREADY
                continue
            if isinstance(outcome, Failure):
                self._credential = None
                raise AttemptError(outcome.phase, outcome)
            if outcome.code == 535:
                self.credentials.rejected(self.account, self._credential)
                self._credential = None
                raise AttemptError(Phase.AUTH, outcome)
            return TransactionResult({r: (Phase.DATA, outcome) for r in recipients})

    async def _post(
        self, url: str, body: bytes, content_type: str, credential: Credential
    ) -> ApiAnswer:
        session = self.clients.session(
            self.base_url, self.account.oauth.ca_file if self.account.oauth else None
        )
        timeout = _request_timeout(self.timeouts)
        headers = {
            "Authorization": f"Bearer {credential.secret}",
            "Content-Type": content_type,
        }
        try:
            async with session.post(url, data=body, headers=headers, timeout=timeout) as resp:
                payload = await resp.read()
                return ApiAnswer(
                    resp.status,
                    parse_error(payload) if resp.status >= 300 else _NO_ERROR,
                    resp.headers.get("Retry-After"),
                )
        except aiohttp.ClientConnectorCertificateError as exc:
            raise _failed(
                Phase.TLS, FailureKind.TLS, f"certificate not trusted: {exc.certificate_error}"
            ) from None
        except aiohttp.ClientConnectorSSLError as exc:
            raise _failed(Phase.TLS, FailureKind.TLS, f"TLS handshake failed: {exc}") from None
        except aiohttp.ClientConnectorError as exc:
            raise _failed(
                Phase.CONNECT, FailureKind.NETWORK, str(exc.os_error) or "cannot connect"
            ) from None
        except (TimeoutError, aiohttp.ServerTimeoutError):
            # Written, but no answer: it may have been sent (at-least-once, as SMTP after
            # the final dot when the 250 is lost).
            raise _failed(
                Phase.DATA,
                FailureKind.TIMEOUT,
                f"no answer from {self.api.value} (it may have been sent)",
            ) from None
        except aiohttp.ClientError as exc:
            raise _failed(
                Phase.DATA, FailureKind.NETWORK, f"{type(exc).__name__}: {exc}"[:200]
            ) from None


_NO_ERROR = parse_error(b"{}")


def _failed(phase: Phase, kind: FailureKind, detail: str) -> AttemptError:
    return AttemptError(phase, Failure(phase, kind, detail))
