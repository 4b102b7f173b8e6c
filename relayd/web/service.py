"""The web listener of a running daemon (SPEC "Web"): the connect pages, the operator page,
``/metrics`` and ``/healthz``, on ``web.address``; HTTPS with ``web.certificate``, else plain
HTTP (the config allows that on loopback only).

``relayd.ops`` builds it with its collaborators (the scheduler for pause and release, the
daemon's credentials for test messages, the status report) and starts it after the
accepting processes are forked, so they never load aiohttp.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from relayd.config.model import Config, WebConfig
from relayd.metrics import Registry
from relayd.queue.scheduler import Scheduler
from relayd.upstream.credentials import CredentialSource
from relayd.web.connect import ConnectPages, Facts
from relayd.web.context import WebContext, security_headers
from relayd.web.exposition import Healthy, exposition_routes
from relayd.web.listener import HttpListener
from relayd.web.operator import OperatorPage
from relayd.web.pages import STYLE

__all__ = ["WebService"]

log = logging.getLogger(__name__)

#: Forms are small; nothing else is ever posted.
MAX_REQUEST_BYTES = 64 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def server_context(settings: WebConfig) -> ssl.SSLContext | None:
    if not settings.tls:
        return None
    assert settings.certificate is not None and settings.private_key is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.certificate), str(settings.private_key))
    return context


class WebService:
    def __init__(
        self,
        *,
        config: Config,
        scheduler: Scheduler,
        credentials: CredentialSource,
        facts: Facts,
        registry: Registry,
        healthy: Healthy,
        released: Callable[[str], None],
        stored: Callable[[], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``stored``: the connect page saved tokens or an app password."""
        assert config.web is not None
        self.ctx = WebContext(config, clock=clock)
        self.settings = config.web
        self.connect = ConnectPages(self.ctx, credentials=credentials, facts=facts, stored=stored)
        self.operator = OperatorPage(self.ctx, scheduler=scheduler, facts=facts, released=released)
        self.registry = registry
        self.healthy = healthy
        self.listener: HttpListener | None = None

    def application(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES, middlewares=[self._pages])
        app.add_routes(self.connect.routes())
        app.add_routes(self.operator.routes())
        app.add_routes(
            [
                web.get(f"{self.ctx.base}/static/relayd.css", self._style),
                web.get(f"{self.ctx.base}/", self._index),
            ]
        )
        app.add_routes(exposition_routes(self.registry, self.healthy))
        return app

    @web.middleware
    async def _pages(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """aiohttp's own error answers (404, 405, 413) as relayd pages, with its headers."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return self.ctx.refusal(exc.status, exc.reason)

    async def _style(self, request: web.Request) -> web.Response:
        del request
        headers = security_headers((), self.ctx.https)
        headers["Cache-Control"] = "max-age=3600"
        return web.Response(body=STYLE, content_type="text/css", headers=headers)

    async def _index(self, request: web.Request) -> web.Response:
        del request
        return self.ctx.html(
            "relayd",
            "<p>This is the web listener of relayd. Mailbox owners open the link they were "
            "sent; operators use the operator page.</p>",
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Raises OSError (address in use...) or ssl.SSLError (certificate)."""
        settings = self.settings
        self.listener = HttpListener(
            self.application(),
            settings.address,
            settings.port,
            ssl_context=server_context(settings),
        )
        await self.listener.start()
        log.info(
            "web pages on %s://%s:%d (public URL %s)",
            "https" if settings.tls else "http",
            settings.address,
            settings.port,
            settings.public_url,
        )

    def reloaded(self, config: Config) -> list[str]:
        """Links, admins and accounts follow the new config at once; the address and
        certificate take effect at the next start (returned: what waits for it)."""
        if config.web is None:
            return ["web removed from the config: the pages close at the next start"]
        notes: list[str] = []
        new, old = config.web, self.settings
        if (new.address, new.port, new.certificate, new.private_key) != (
            old.address,
            old.port,
            old.certificate,
            old.private_key,
        ):
            notes.append("web.address or its certificate changed: takes effect at the next start")
        if new.public_url != old.public_url:
            notes.append("web.public_url changed: takes effect at the next start")
            return notes
        self.ctx.config = config
        return notes

    async def close(self) -> None:
        if self.listener is not None:
            await self.listener.close()
            self.listener = None
