"""One HTTP(S) listener for an aiohttp application, started and closed with the daemon.

aiohttp's own access log prints the request line, and a connect link carries its token in
the path: the access log here names the route pattern (``/connect/{token}``), never the
path, and goes through relayd's logging and its redaction filter like every other line.
"""

from __future__ import annotations

import logging
import ssl

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

__all__ = ["HttpListener", "route_of"]

log = logging.getLogger(__name__)


def route_of(request: BaseRequest) -> str:
    """The route pattern a request matched (no path parameter values), else "-"."""
    if isinstance(request, web.Request):
        resource = request.match_info.route.resource
        if resource is not None:
            return resource.canonical
    return "-"


class _AccessLog(AbstractAccessLogger):
    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        log.debug(
            "%s %s %d (%.0f ms)", request.method, route_of(request), response.status, time * 1000
        )


class HttpListener:
    """``await start()``, then ``port``; ``await close()``."""

    def __init__(
        self,
        app: web.Application,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.app = app
        self.host = host
        self.wanted_port = port
        self.ssl_context = ssl_context
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        runner = web.AppRunner(
            self.app, handle_signals=False, access_log_class=_AccessLog, access_log=log
        )
        await runner.setup()
        site = web.TCPSite(
            runner, self.host, self.wanted_port, ssl_context=self.ssl_context, reuse_address=True
        )
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    @property
    def port(self) -> int | None:
        if self._runner is None or not self._runner.addresses:
            return None
        return int(self._runner.addresses[0][1])

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
