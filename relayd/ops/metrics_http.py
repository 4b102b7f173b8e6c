"""``GET /metrics`` and ``GET /healthz``: the registry of ``relayd.metrics`` over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from relayd.metrics import Registry

__all__ = ["MetricsServer"]

_MAX_REQUEST_HEAD = 8192


class MetricsServer:
    """``GET /metrics`` and ``GET /healthz`` over HTTP/1.0-style one-shot connections."""

    def __init__(
        self, registry: Registry, healthy: Callable[[], tuple[bool, str]] = lambda: (True, "ok")
    ) -> None:
        self.registry = registry
        self.healthy = healthy
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port, reuse_address=True)

    @property
    def port(self) -> int | None:
        if self._server is None or not self._server.sockets:
            return None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            status, body, ctype = self._answer(head)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + (b"" if head.startswith(b"HEAD ") else body)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _answer(self, head: bytes) -> tuple[str, bytes, str]:
        if len(head) > _MAX_REQUEST_HEAD:
            return "431 Request Header Fields Too Large", b"", "text/plain"
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"GET only\n", "text/plain"
        path = parts[1].split(b"?", 1)[0]
        if path == b"/metrics":
            text = self.registry.render()
            return "200 OK", text.encode(), "text/plain; version=0.0.4; charset=utf-8"
        if path == b"/healthz":
            ok, why = self.healthy()
            status = "200 OK" if ok else "503 Service Unavailable"
            return status, (why + "\n").encode(), "text/plain; charset=utf-8"
        return "404 Not Found", b"not found\n", "text/plain"
