"""The loopback redirect of a browser consent (RFC 8252 §7.3): one request, then done.

An installed application registers ``http://localhost`` (Microsoft) or ``http://127.0.0.1``
(Google) with any port; the provider sends the browser back there with ``code`` and ``state``
in the query. The listener binds 127.0.0.1 only, answers one request with a short page, and
hands the query to the caller. Over SSH the user forwards the port (``ssh -L``) or, for
Google, pastes the address the browser ended on instead (``--no-browser``).
"""

from __future__ import annotations

import http.server
import socket
import threading
from urllib.parse import parse_qs, urlparse

__all__ = ["LoopbackRedirect", "query_of"]

_PAGE = (
    b"<!doctype html><title>relayd</title><p>relayd received the answer of the sign-in. "
    b"You can close this window and return to the terminal.</p>"
)


def query_of(url: str) -> dict[str, str]:
    """The query parameters of a redirect URL (first value of each)."""
    return {k: v[0] for k, v in parse_qs(urlparse(url.strip()).query).items() if v}


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:
        query = query_of(self.path)
        if "code" not in query and "error" not in query:
            self.send_response(404)  # a favicon or a stray request: keep waiting
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(_PAGE)))
        self.end_headers()
        self.wfile.write(_PAGE)
        self.server.answer = query
        self.server.done.set()

    def log_message(self, format: str, *args: object) -> None:
        del format, args  # the query holds the authorization code: never print it


class _Server(http.server.HTTPServer):
    answer: dict[str, str] | None = None
    done: threading.Event


class LoopbackRedirect:
    """``with LoopbackRedirect() as redirect:`` → ``redirect.port``, ``redirect.wait()``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = _Server((host, port), _Handler)
        self._server.done = threading.Event()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def __enter__(self) -> LoopbackRedirect:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def wait(self, timeout: float | None = None) -> dict[str, str] | None:
        """The redirect's query, or None if nothing came within ``timeout``."""
        self._server.done.wait(timeout)
        return self._server.answer


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
