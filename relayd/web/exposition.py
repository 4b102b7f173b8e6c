"""``GET /metrics`` (Prometheus text, from ``relayd.metrics``) and ``GET /healthz``.

Served on the web listener when ``web`` is configured, and on the ``metrics`` listener when
that is: the same two routes either way.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from relayd.metrics import CONTENT_TYPE, Registry

__all__ = ["Healthy", "exposition_routes", "metrics_application"]

#: () -> (healthy, why): the daemon's own view of whether it can take mail.
Healthy = Callable[[], tuple[bool, str]]


def exposition_routes(registry: Registry, healthy: Healthy) -> list[web.RouteDef]:
    async def metrics(request: web.Request) -> web.Response:
        del request
        body = registry.render().encode()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def healthz(request: web.Request) -> web.Response:
        del request
        ok, why = healthy()
        return web.Response(text=why + "\n", status=200 if ok else 503)

    # GET routes answer HEAD too (aiohttp's allow_head).
    return [web.get("/metrics", metrics), web.get("/healthz", healthz)]


def metrics_application(registry: Registry, healthy: Healthy) -> web.Application:
    """The ``metrics:`` listener: the two routes alone."""
    app = web.Application()
    app.add_routes(exposition_routes(registry, healthy))
    return app
