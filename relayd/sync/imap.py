"""One IMAP session to an account's mailbox (aioimaplib underneath): log in, find, append.

What aioimaplib 2.0.3 leaves to its caller, done here:

- STARTTLS: it has no method for it, so the command is sent and the transport upgraded with
  ``loop.start_tls()``; capabilities are asked again afterwards (RFC 3501 §6.2.1). TLS is
  never opportunistic: no STARTTLS offered means no session.
- Timeouts: every call is bounded, and a call also ends at once when the connection drops
  (aioimaplib leaves a pending command waiting forever). A session that timed out is closed,
  never reused: aioimaplib would still wait for the abandoned command's reply.
- AUTHENTICATE sends each response on its own line after the server's ``+`` (no SASL-IR, no
  2 KB token on the command line), and answers an XOAUTH2 error challenge with an empty line
  so that Dovecot says NO instead of waiting: a refused token must look different from a
  server that is down.
- Mailbox names are quoted here (``relayd.sync.wire``); aioimaplib passes them as given.

Library and socket errors are mapped at this boundary into ``ImapError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aioimaplib

from relayd.config.model import AccountConfig, ImapServer, TlsMode
from relayd.errors import RelaydError
from relayd.sync import wire
from relayd.tls import client_context

__all__ = [
    "DEFAULT_TIMEOUTS",
    "ImapError",
    "ImapFailure",
    "ImapSession",
    "ImapTimeouts",
    "PasswordSource",
    "TokenSource",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: ``async def token_for(account) -> str``: an OAuth2 access token for the account.
TokenSource = Callable[[AccountConfig], Awaitable[str]]
#: ``async def password_for(account) -> str | None``: the app password its owner gave on the
#: connect page (``password: {connect: true}``), None while none is stored.
PasswordSource = Callable[[AccountConfig], Awaitable[str | None]]


class ImapFailure(enum.Enum):
    NETWORK = "network"
    TLS = "tls"
    TIMEOUT = "timeout"
    LOGIN_REFUSED = "login-refused"  # credentials or token refused
    NO_TOKEN = "no-token"  # no OAuth2 token to be had right now
    NO_FOLDER = "no-folder"  # no sent_folder set and none flagged \Sent, or it does not exist
    TOO_BIG = "too-big"  # the server will never take this message
    REFUSED = "refused"  # NO to a command: quota, permissions, a broken server
    PROTOCOL = "protocol"


class ImapError(RelaydError, ConnectionError):
    def __init__(self, kind: ImapFailure, detail: str, *, ambiguous: bool = False) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        # The command may have taken effect though no reply came back (an APPEND cut off).
        self.ambiguous = ambiguous


@dataclass(frozen=True)
class ImapTimeouts:
    connect: float = 30.0  # TCP + TLS + greeting
    command: float = 60.0
    append: float = 300.0  # the whole literal plus the tagged reply


DEFAULT_TIMEOUTS = ImapTimeouts()


class _Authenticate(aioimaplib.Command):  # type: ignore[misc]
    """AUTHENTICATE with its client responses sent on their own lines (RFC 3501 §6.2.2)."""

    def __init__(
        self,
        tag: str,
        mechanism: str,
        responses: list[bytes],
        write: Callable[[bytes], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__("AUTHENTICATE", tag, mechanism, loop=loop)
        self._responses = responses
        self._write = write

    def append_to_resp(self, line: bytes, result: str = "Pending") -> None:
        if result == "Pending" and isinstance(line, bytes) and line.startswith(b"+"):
            # A challenge. Once our responses are used up, the challenge is an error report
            # (XOAUTH2 sends a JSON status): an empty response makes the server finish with NO.
            self._write((self._responses.pop(0) if self._responses else b"") + b"\r\n")
            return
        super().append_to_resp(line, result)


def _failure_from(exc: BaseException, what: str) -> ImapError:
    if isinstance(exc, ImapError):
        return exc
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ImapError(ImapFailure.TLS, f"certificate not trusted: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError):
        return ImapError(ImapFailure.TLS, f"TLS handshake failed: {exc.reason}")
    if isinstance(exc, (TimeoutError, aioimaplib.CommandTimeout)):
        return ImapError(ImapFailure.TIMEOUT, f"{what}: timed out")
    if isinstance(exc, OSError):
        return ImapError(ImapFailure.NETWORK, f"{what}: {exc.strerror or exc}")
    return ImapError(ImapFailure.PROTOCOL, f"{what}: {type(exc).__name__}: {exc}")


def _text(response: Any) -> str:
    """The tagged reply's text, e.g. "[AUTHENTICATIONFAILED] Authentication failed."."""
    lines = list(response.lines)
    last = bytes(lines[-1]) if lines else b""
    return last.decode("utf-8", "replace").strip()


class ImapSession:
    """Connect, secure, log in once; then any number of searches and appends."""

    def __init__(
        self,
        account: AccountConfig,
        *,
        token_source: TokenSource | None = None,
        password_source: PasswordSource | None = None,
        timeouts: ImapTimeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        assert account.imap is not None
        self.account = account
        self.server: ImapServer = account.imap
        self.token_source = token_source
        self.password_source = password_source
        self.timeouts = timeouts
        self._client: Any = None
        self._lost: asyncio.Future[None] | None = None

    @property
    def where(self) -> str:
        return f"{self.server.host}:{self.server.port}"

    @property
    def is_open(self) -> bool:
        return self._client is not None and self._lost is not None and not self._lost.done()

    @property
    def _protocol(self) -> Any:
        assert self._client is not None, "open() first"
        return self._client.protocol

    # -- bounded calls --------------------------------------------------------------------

    async def _bounded(
        self, call: Awaitable[T], timeout: float, what: str, *, ambiguous: bool = False
    ) -> T:
        """Run one call until it answers, times out, or the connection drops."""
        lost = self._lost
        assert lost is not None
        task: asyncio.Future[T] = asyncio.ensure_future(call)
        waiters: set[asyncio.Future[Any]] = {task, lost}
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            task.cancel()
            self.close()
            raise
        if task in done:
            try:
                return task.result()
            except Exception as exc:
                self.close()
                err = _failure_from(exc, what)
                raise ImapError(err.kind, err.detail, ambiguous=ambiguous) from None
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        was_lost = lost.done()
        self.close()
        if was_lost:
            raise ImapError(ImapFailure.NETWORK, f"{what}: connection lost", ambiguous=ambiguous)
        raise ImapError(ImapFailure.TIMEOUT, f"{what}: timed out", ambiguous=ambiguous)

    def _on_lost(self, exc: Exception | None) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    # -- opening --------------------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        tls = self.server.tls
        ctx = client_context(str(self.server.ca_file) if self.server.ca_file else None)
        self._lost = loop.create_future()
        self._client = aioimaplib.IMAP4(
            host=self.server.host,
            port=self.server.port,
            timeout=self.timeouts.command,
            conn_lost_cb=self._on_lost,
            ssl_context=ctx if tls is TlsMode.IMPLICIT else None,
        )
        try:
            await self._bounded(
                self._client.wait_hello_from_server(), self.timeouts.connect, "connect"
            )
            if tls is TlsMode.STARTTLS:
                await self._starttls(loop, ctx)
            await self._login()
            await self._bounded(self._protocol.capability(), self.timeouts.command, "CAPABILITY")
        except BaseException:
            self.close()
            raise
        log.debug("IMAP session open to %s", self.where, extra={"account": self.account.address})

    async def _starttls(self, loop: asyncio.AbstractEventLoop, ctx: ssl.SSLContext) -> None:
        protocol = self._protocol
        if "STARTTLS" not in protocol.capabilities:
            raise ImapError(ImapFailure.TLS, "server does not offer STARTTLS")
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=loop)
        response = await self._bounded(protocol.execute(command), self.timeouts.command, "STARTTLS")
        if response.result != "OK":
            raise ImapError(ImapFailure.TLS, f"STARTTLS refused: {_text(response)}")
        transport = await self._bounded(
            loop.start_tls(protocol.transport, protocol, ctx, server_hostname=self.server.host),
            self.timeouts.connect,
            "TLS handshake",
        )
        protocol.transport = transport
        # RFC 3501 §6.2.1: capabilities learned before TLS must be discarded.
        await self._bounded(protocol.capability(), self.timeouts.command, "CAPABILITY")

    async def _login(self) -> None:
        server, account = self.server, self.account
        username = server.username or account.username or account.address
        secret = server.password or account.password
        if secret is None and account.oauth is not None:
            await self._xoauth2(username)
            return
        if secret is not None:
            password = secret.reveal()
        elif account.connect_password:
            password = await self._connected_password()
        else:
            raise ImapError(ImapFailure.LOGIN_REFUSED, "no IMAP password configured")
        protocol = self._protocol
        plain_text_ok = username.isascii() and password.isascii()
        if plain_text_ok and "LOGINDISABLED" not in protocol.capabilities:
            response = await self._bounded(
                protocol.login(wire.quote(username), password), self.timeouts.command, "LOGIN"
            )
        else:
            # Non-ASCII credentials do not fit LOGIN's quoted strings; PLAIN is UTF-8.
            response = await self._authenticate("PLAIN", [wire.plain_response(username, password)])
        self._check_login(response, "LOGIN")

    async def _connected_password(self) -> str:
        found: str | None = None
        if self.password_source is not None:
            try:
                found = await asyncio.wait_for(
                    self.password_source(self.account), self.timeouts.command
                )
            except Exception as exc:
                raise ImapError(ImapFailure.NO_TOKEN, f"no app password: {exc}") from None
        if found is None:
            # Like a missing OAuth consent: the copy waits until the owner connects.
            raise ImapError(ImapFailure.NO_TOKEN, "no app password connected yet")
        return found

    async def _xoauth2(self, username: str) -> None:
        if self.token_source is None:
            raise ImapError(ImapFailure.NO_TOKEN, "no OAuth2 token source for IMAP")
        try:
            token = await asyncio.wait_for(self.token_source(self.account), self.timeouts.command)
        except ImapError:
            raise
        except Exception as exc:
            # Whatever the token source says (endpoint down, consent needed), the copy waits.
            raise ImapError(ImapFailure.NO_TOKEN, f"no OAuth2 token: {exc}") from None
        response = await self._authenticate("XOAUTH2", [wire.xoauth2_response(username, token)])
        self._check_login(response, "AUTHENTICATE XOAUTH2")

    async def _authenticate(self, mechanism: str, responses: list[bytes]) -> Any:
        protocol = self._protocol

        def write(data: bytes) -> None:
            protocol.transport.write(data)

        command = _Authenticate(
            protocol.new_tag(), mechanism, responses, write, asyncio.get_running_loop()
        )
        response = await self._bounded(
            protocol.execute(command), self.timeouts.command, f"AUTHENTICATE {mechanism}"
        )
        if response.result == "OK":
            protocol.state = aioimaplib.AUTH
        return response

    def _check_login(self, response: Any, what: str) -> None:
        if response.result == "OK":
            return
        text = _text(response)
        kind = ImapFailure.LOGIN_REFUSED if response.result == "NO" else ImapFailure.PROTOCOL
        raise ImapError(kind, f"{what} refused: {text}")

    # -- folders --------------------------------------------------------------------------

    async def list_mailboxes(self) -> list[wire.ListEntry]:
        protocol = self._protocol
        args = ['""', '"*"']
        if {"SPECIAL-USE", "LIST-EXTENDED"} <= protocol.capabilities:
            # RFC 6154 §2: the server need not show special-use attributes unless asked.
            args += ["RETURN", "(SPECIAL-USE)"]
        response = await self._bounded(
            protocol.simple_command("LIST", *args), self.timeouts.command, "LIST"
        )
        if response.result != "OK":
            raise ImapError(ImapFailure.REFUSED, f"LIST refused: {_text(response)}")
        return wire.parse_list(list(response.lines))

    async def find_sent_folder(self) -> str:
        """The ``\\Sent`` special-use folder (RFC 6154), as an IMAP argument."""
        sent = wire.find_special_use(await self.list_mailboxes(), "\\Sent")
        if sent is None:
            raise ImapError(
                ImapFailure.NO_FOLDER,
                "no folder is flagged \\Sent (RFC 6154) on this server: set imap.sent_folder",
            )
        return sent.argument

    async def _select(self, mailbox: str) -> None:
        response = await self._bounded(
            self._protocol.select(mailbox), self.timeouts.command, "SELECT"
        )
        if response.result != "OK":
            kind = ImapFailure.NO_FOLDER if response.result == "NO" else ImapFailure.PROTOCOL
            raise ImapError(kind, f"SELECT {mailbox} refused: {_text(response)}")

    async def contains(self, mailbox: str, msgid: str) -> bool:
        """Whether ``mailbox`` holds a message with this Message-ID (RFC 3501 §6.4.4)."""
        # SELECT again each time: a fresh view includes what an earlier session appended.
        await self._select(mailbox)
        response = await self._bounded(
            self._protocol.search("HEADER", "Message-ID", wire.quote(msgid), charset=None),
            self.timeouts.command,
            "SEARCH",
        )
        if response.result != "OK":
            raise ImapError(ImapFailure.REFUSED, f"SEARCH refused: {_text(response)}")
        return bool(wire.parse_search(list(response.lines)))

    async def append(self, mailbox: str, content: bytes, *, when: float, seen: bool = True) -> str:
        """APPEND with ``when`` as internal date, flagged \\Seen unless ``seen`` is False
        (RFC 3501 §6.3.11, RFC 9051 §6.3.12). Returns the server's reply text (APPENDUID
        with UIDPLUS)."""
        response = await self._bounded(
            self._protocol.append(
                content,
                mailbox=mailbox,
                flags="(\\Seen)" if seen else "()",
                date=wire.internal_date(when),
            ),
            self.timeouts.append,
            "APPEND",
            ambiguous=True,
        )
        text = _text(response)
        if response.result == "OK":
            return text
        code = wire.response_code(text)
        if code in ("TRYCREATE", "NONEXISTENT"):
            raise ImapError(ImapFailure.NO_FOLDER, f"APPEND to {mailbox}: {text}")
        if code == "TOOBIG":
            raise ImapError(ImapFailure.TOO_BIG, f"APPEND to {mailbox}: {text}")
        raise ImapError(ImapFailure.REFUSED, f"APPEND to {mailbox}: {text}")

    # -- closing --------------------------------------------------------------------------

    async def logout(self) -> None:
        if not self.is_open:
            self.close()
            return
        with contextlib.suppress(ImapError):
            await self._bounded(self._protocol.logout(), 5.0, "LOGOUT")
        self.close()

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        transport = getattr(client.protocol, "transport", None)
        if transport is not None:
            transport.close()
        task = getattr(client, "_client_task", None)
        if task is not None and not task.done():
            task.cancel()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
