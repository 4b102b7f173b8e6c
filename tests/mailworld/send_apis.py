"""HTTPS endpoints of the two HTTP send APIs for the mail world: Microsoft Graph ``sendMail``
(MIME as base64 text) and the Gmail API ``messages.send`` (media upload).

They follow the documented request and response shapes:

- Graph: ``POST /v1.0/users/{id}/sendMail``, ``Content-Type: text/plain``, body the base64 of
  the MIME; ``202 Accepted`` with no body; errors as ``{"error": {"code", "message"}}``
  (``InvalidAuthenticationToken`` 401, ``ErrorAccessDenied`` 403, ``ErrorInvalidRecipients``
  or "Invalid base64 string for MIME content" 400, 413 beyond 4 MB).
- Gmail: ``POST /upload/gmail/v1/users/{id}/messages/send?uploadType=media``,
  ``Content-Type: message/rfc822``; ``200`` with ``{"id", "threadId", "labelIds": ["SENT"]}``;
  errors as ``{"error": {"code", "message", "errors": [{"reason"}], "status"}}``.

Every request's bearer token is checked at the suite's OAuth server (active, issued for this
mailbox or, app-only, for its domain, and carrying the API's scope). An accepted message is
delivered as the services do: to the addresses of its ``To:``/``Cc:``/``Bcc:`` fields, with
``Bcc:`` removed, over LMTP into the real Dovecot; and a copy (with ``Bcc:``) is filed in the
sender's Sent folder by the endpoint itself, straight into its Maildir.

Tests inject replies (any status, body and headers, for the next requests), make the endpoint
read a request and then never answer, and read what it saw: requests per mailbox, the most
in flight at once per mailbox, and when each request came.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import json
import os
import secrets
import smtplib
import socket
import ssl
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from .world import MailWorld

__all__ = ["GMAIL_SEND_SCOPE", "GRAPH_APP_SCOPE", "GRAPH_SEND_SCOPE", "Injected", "SendApi"]

HOST = "127.0.0.1"
GRAPH_SEND_SCOPE = "https://graph.microsoft.com/Mail.Send"
GRAPH_APP_SCOPE = "https://graph.microsoft.com/.default"
GMAIL_SEND_SCOPE = "https://www.googleapis.com/auth/gmail.send"
GRAPH_REQUEST_LIMIT = 4 * 1024 * 1024
GMAIL_UPLOAD_LIMIT = 35 * 1024 * 1024
# Recipients at this domain are "not resolved" (Graph) / invalid (Gmail): a 400.
INVALID_DOMAIN = "invalid.test"


@dataclass
class Injected:
    """A reply the endpoint gives instead of its own, to the next matching request."""

    status: int
    body: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # Read the request, deliver it (it "may have been sent"), then never answer.
    stall: bool = False
    mailbox: str | None = None  # only for this mailbox (None: any)


@dataclass
class Seen:
    """One request as the endpoint saw it."""

    mailbox: str
    at: float  # time.time() when its headers were read
    status: int = 0  # what it answered (0: nothing)
    answered_at: float = 0.0


@dataclass
class _State:
    injected: deque[Injected] = field(default_factory=deque)
    seen: list[Seen] = field(default_factory=list)
    in_flight: Counter[str] = field(default_factory=Counter)
    max_in_flight: Counter[str] = field(default_factory=Counter)
    delivered: list[tuple[str, tuple[str, ...], bytes]] = field(default_factory=list)


class SendApi:
    """``kind`` is ``"graph"`` or ``"gmail"``. Start with :meth:`start`."""

    def __init__(self, world: MailWorld, kind: str) -> None:
        assert kind in ("graph", "gmail")
        self.world = world
        self.kind = kind
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.load_cert_chain(str(world.pki.server_cert), str(world.pki.server_key))
        self._lock = threading.Lock()
        self.state = _State()
        self._httpd: _Server | None = None
        self.stall_seconds = 60.0  # how long a stalled request is held before the socket closes
        self._release = threading.Event()

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"https://{HOST}:{self._httpd.server_address[1]}"

    def start(self) -> None:
        server = _Server((HOST, 0), _Handler)
        server.api = self
        server.socket = self._ctx.wrap_socket(server.socket, server_side=True)
        self._httpd = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        server, self._httpd = self._httpd, None
        self._release.set()
        if server is not None:
            server.shutdown()
            server.server_close()

    # -- test controls ----------------------------------------------------------------

    def inject(self, reply: Injected, times: int = 1) -> None:
        with self._lock:
            self.state.injected.extend(reply for _ in range(times))

    def requests(self, mailbox: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.state.seen if mailbox is None or s.mailbox == mailbox]

    def max_concurrency(self, mailbox: str) -> int:
        with self._lock:
            return self.state.max_in_flight[mailbox.lower()]

    def delivered(self) -> list[tuple[str, tuple[str, ...], bytes]]:
        """(mailbox, recipients it went to, MIME as received) of each accepted message."""
        with self._lock:
            return list(self.state.delivered)

    # -- request handling (called by the handler thread) --------------------------------

    def _take_injected(self, mailbox: str) -> Injected | None:
        with self._lock:
            for reply in self.state.injected:
                if reply.mailbox is None or reply.mailbox == mailbox:
                    self.state.injected.remove(reply)
                    return reply
        return None

    def _begin(self, mailbox: str) -> Seen:
        seen = Seen(mailbox, time.time())
        with self._lock:
            self.state.seen.append(seen)
            self.state.in_flight[mailbox] += 1
            self.state.max_in_flight[mailbox] = max(
                self.state.max_in_flight[mailbox], self.state.in_flight[mailbox]
            )
        return seen

    def _end(self, seen: Seen, status: int) -> None:
        with self._lock:
            self.state.in_flight[seen.mailbox] -= 1
            seen.status = status
            seen.answered_at = time.time()

    def token_problem(self, mailbox: str, authorization: str) -> tuple[int, str, str] | None:
        """(status, code, message) when the bearer token may not send as ``mailbox``."""
        if not authorization.startswith("Bearer "):
            return 401, "InvalidAuthenticationToken", "Access token is empty."
        info = self.world.oauth.introspect(authorization[7:])
        if not info.get("active"):
            return 401, "InvalidAuthenticationToken", "Access token validation failure."
        scopes = set(str(info.get("scope", "")).split())
        app_mailboxes = str(info.get("app_mailboxes", ""))
        app_only = str(info.get("username", "")).startswith("app:")
        if app_only:
            if not (app_mailboxes.startswith("*@") and mailbox.endswith(app_mailboxes[1:])):
                return (
                    403,
                    "ErrorAccessDenied",
                    "Access is denied. Check credentials and try again.",
                )
        elif info.get("username") != mailbox:
            return 403, "ErrorAccessDenied", "Access is denied. Check credentials and try again."
        if self.kind == "graph":
            needed = GRAPH_APP_SCOPE if app_only else GRAPH_SEND_SCOPE
            if needed not in scopes:
                return (
                    403,
                    "ErrorAccessDenied",
                    "Access is denied. Check credentials and try again.",
                )
        elif not scopes & {GMAIL_SEND_SCOPE, "https://mail.google.com/"}:
            return 403, "insufficientPermissions", "Request had insufficient authentication scopes."
        return None

    def error_doc(self, status: int, code: str, message: str) -> dict[str, Any]:
        if self.kind == "graph":
            return {"error": {"code": code, "message": message}}
        return {
            "error": {
                "code": status,
                "message": message,
                "errors": [{"message": message, "domain": "global", "reason": code}],
                "status": {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED"}.get(
                    status, "PERMISSION_DENIED"
                ),
            }
        }

    def accept(self, mailbox: str, mime: bytes) -> tuple[int, dict[str, Any] | None]:
        """Deliver ``mime`` as the service would; the answer."""
        recipients = _header_recipients(mime)
        if not recipients:
            return 400, self.error_doc(400, "invalidArgument", "Recipient address required")
        bad = [r for r in recipients if r.endswith("@" + INVALID_DOMAIN)]
        if bad:
            code = "ErrorInvalidRecipients" if self.kind == "graph" else "invalidArgument"
            message = f"At least one recipient is not valid., Recipient '{bad[0]}' is not resolved."
            if self.kind == "gmail":
                message = f"Invalid To header: {bad[0]}"
            return 400, self.error_doc(400, code, message)
        delivered = _without_bcc(mime)
        local = [r for r in recipients if r.endswith("@" + self.world.domain)]
        if local:
            with smtplib.LMTP(HOST, self.world.lmtp_port, timeout=30) as lmtp:
                # One transaction per recipient: smtplib reads one reply after DATA, while
                # LMTP gives one per recipient (RFC 2033 §4.2).
                for rcpt in local:
                    lmtp.sendmail(mailbox, [rcpt], delivered)
        self._file_sent(mailbox, mime)
        with self._lock:
            self.state.delivered.append((mailbox, tuple(recipients), mime))
        if self.kind == "graph":
            return 202, None
        ident = secrets.token_hex(8)
        return 200, {"id": ident, "threadId": ident, "labelIds": ["SENT"]}

    def _file_sent(self, mailbox: str, mime: bytes) -> None:
        """Exchange saves the MIME to Sent Items; Gmail labels it SENT: one copy, by the
        service, in the sender's Sent folder."""
        if mailbox not in self.world.users:
            return
        folder = self.world.maildir(mailbox, "Sent")
        for sub in ("tmp", "new", "cur"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            os.chown(folder / sub, 8, 8)
        os.chown(folder, 8, 8)
        name = f"{int(time.time())}.M{secrets.randbelow(10**6)}P{os.getpid()}.sendapi"
        tmp = folder / "tmp" / name
        tmp.write_bytes(mime.replace(b"\r\n", b"\n"))
        os.chown(tmp, 8, 8)
        os.replace(tmp, folder / "new" / name)


def _header_section(mime: bytes) -> bytes:
    end = mime.find(b"\r\n\r\n")
    return mime if end < 0 else mime[: end + 2]


def _fields(head: bytes) -> list[bytes]:
    fields: list[bytes] = []
    for line in head.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


def _header_recipients(mime: bytes) -> list[str]:
    values = [
        f.split(b":", 1)[1].decode("utf-8", "replace")
        for f in _fields(_header_section(mime))
        if f.split(b":", 1)[0].strip().lower() in (b"to", b"cc", b"bcc")
    ]
    found = [a.lower() for _, a in email.utils.getaddresses(values) if "@" in a]
    return list(dict.fromkeys(found))


def _without_bcc(mime: bytes) -> bytes:
    head = _header_section(mime)
    kept = [f for f in _fields(head) if f.split(b":", 1)[0].strip().lower() != b"bcc"]
    return b"".join(kept) + mime[len(head) :]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    api: SendApi


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        del format, args

    _current: Seen | None = None

    def _send(self, status: int, doc: dict[str, Any] | None, headers: dict[str, str]) -> None:
        body = json.dumps(doc).encode() if doc is not None else b""
        if self._current is not None:
            # Recorded before the answer is written: once the client has it, the test sees
            # it too (and the client cannot send its next request on this slot before).
            self.server.api._end(self._current, status)
            self._current = None
        self.send_response(status)
        if doc is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _mailbox(self) -> str | None:
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        if self.server.api.kind == "graph":
            if len(parts) == 4 and parts[:2] == ["v1.0", "users"] and parts[3] == "sendMail":
                return parts[2].lower()
            return None
        shape = ["upload", "gmail", "v1", "users"]
        if len(parts) == 7 and parts[:4] == shape and parts[5:] == ["messages", "send"]:
            if "uploadType=media" not in url.query:
                return None
            return parts[4].lower()
        return None

    def do_POST(self) -> None:
        api = self.server.api
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        mailbox = self._mailbox()
        if mailbox is None:
            self._send(404, {"error": {"code": "NotFound", "message": self.path}}, {})
            return
        self._current = api._begin(mailbox)
        try:
            self._answer(api, mailbox, body)
        finally:
            if self._current is not None:  # never answered (a stall)
                api._end(self._current, 0)
                self._current = None

    def _answer(self, api: SendApi, mailbox: str, body: bytes) -> int:
        injected = api._take_injected(mailbox)
        if injected is not None and not injected.stall:
            self._send(injected.status, injected.body, injected.headers)
            return injected.status
        problem = api.token_problem(mailbox, self.headers.get("Authorization", ""))
        if problem is not None:
            status, code, message = problem
            headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'} if status == 401 else {}
            self._send(status, api.error_doc(status, code, message), headers)
            return status
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if api.kind == "graph":
            if len(body) > GRAPH_REQUEST_LIMIT:
                doc = api.error_doc(
                    413, "RequestEntityTooLarge", "The maximum request length supported is 4MB."
                )
                self._send(413, doc, {})
                return 413
            if content_type != "text/plain":
                self._send(400, api.error_doc(400, "RequestBodyRead", "Content-Type"), {})
                return 400
            try:
                mime = base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError):
                doc = api.error_doc(
                    400,
                    "ErrorMimeContentInvalidBase64String",
                    "Invalid base64 string for MIME content.",
                )
                self._send(400, doc, {})
                return 400
        else:
            if len(body) > GMAIL_UPLOAD_LIMIT:
                self._send(413, api.error_doc(413, "uploadTooLarge", "Request too large"), {})
                return 413
            if content_type != "message/rfc822":
                self._send(400, api.error_doc(400, "badContent", "Media type not supported"), {})
                return 400
            mime = body
        status, answer = api.accept(mailbox, mime)
        if injected is not None and injected.stall:
            # Taken and sent, but the answer never comes: the client's timeout decides.
            api._release.wait(api.stall_seconds)
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return 0
        self._send(status, answer, {})
        return status
