"""The SMTP protocol towards local applications: aiosmtpd's ``SMTP``, with DATA streamed.

aiosmtpd gathers a whole message in memory line by line, answers bare-LF mail with ``500 Line
too long`` and has no enhanced status codes on its own replies (aiosmtpd 1.4). This
subclass keeps its command loop, its AUTH mechanisms and its STARTTLS (which discards
plaintext buffered before the handshake, CVE-2024-34083) and replaces the rest:

- DATA is read in large blocks (``relayd.inbound.datastream``), decoded and written to the
  spool as it arrives; ``250`` only after the spool file and its directory are fsync'd;
- only ``<CR><LF>.<CR><LF>`` ends DATA (SMTP smuggling, CVE-2023-51764 / CVE-2024-27305);
- EHLO advertises what relayd does, AUTH only over TLS or on loopback/unix listeners;
- every 2xx/4xx/5xx reply carries an enhanced status code (RFC 2034 §3), and an internal
  error is ``451 4.3.0`` without the exception text.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import re
import ssl
from collections.abc import Callable
from typing import AnyStr

from aiosmtpd.smtp import SMTP, TLSSetupException, syntax

from relayd.config.apis import advertised_size
from relayd.config.model import AuthPolicy, ListenerConfig
from relayd.core.routing import UnixUser
from relayd.inbound.datastream import MessageStream, read_data_section
from relayd.inbound.handler import InboundHandler, RelaySession, Transaction, hook_names
from relayd.inbound.submission import INTERNAL_REPLY
from relayd.unixsocket import peer_user

__all__ = [
    "RelaySMTP",
    "auth_offered",
    "with_enhanced_code",
]

log = logging.getLogger("relayd.inbound")

# aiosmtpd logs every command line at INFO through sanitized_log(), which masks the argument
# of "AUTH <mechanism> <response>" but not a base64 credential line that a confused client
# sends as a command, and its warning about unknown commands quotes the command word. Keeping
# its logger at WARNING, with that one warning redacted, means no AUTH payload or password
# reaches relayd's logs whatever log_level says.
_AIOSMTPD_LOG = logging.getLogger("mail.log")
_AIOSMTPD_LOG.setLevel(logging.WARNING)


class _RedactUnknownCommand(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "%r unrecognised: %s" and isinstance(record.args, tuple):
            record.args = (record.args[0], "(redacted)")
        return True


_AIOSMTPD_LOG.addFilter(_RedactUnknownCommand())

# RFC 5321 §4.5.3.1.4: 512 octets, plus what the extensions in use add to MAIL FROM:
# SIZE= (RFC 1870: 26), SMTPUTF8 (RFC 6531: 10), BODY=8BITMIME, AUTH= (RFC 4954: 500).
_MAIL_LINE_LIMIT = 512 + 26 + 10 + 16 + 500

_ENHANCED = re.compile(r"[245]\d\d[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
# The enhanced code given to aiosmtpd's own replies (RFC 3463 classes).
_DETAIL = {
    "214": "2.0.0", "220": "2.0.0", "221": "2.0.0", "235": "2.7.0", "250": "2.0.0",
    "252": "2.5.0", "421": "4.3.0", "451": "4.3.0", "452": "4.3.1", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "535": "5.7.8", "538": "5.7.11", "552": "5.3.4", "553": "5.1.3",
    "554": "5.7.0", "555": "5.5.4",
}  # fmt: skip
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_PATH = re.compile(rf"\s*<({_ATOM}(?:\.{_ATOM})*@{_ATOM}(?:\.{_ATOM})*)>\s*(.*)", re.S)
_AUTH_PARAM = re.compile(r"\s+AUTH=\S*", re.IGNORECASE)


def with_enhanced_code(reply: str) -> str:
    """``503 Error: need RCPT command`` → ``503 5.5.1 Error: need RCPT command``."""
    if len(reply) < 4 or reply[0] not in "245" or _ENHANCED.match(reply):
        return reply
    code = reply[:3]
    detail = _DETAIL.get(code, f"{code[0]}.0.0")
    return f"{reply[:4]}{detail} {reply[4:]}"


def auth_offered(listener: ListenerConfig, tls_active: bool) -> bool:
    """AUTH only where credentials cannot be sniffed: over TLS, or on a loopback or unix
    listener (SPEC "SMTP towards clients"); never where the listener says ``auth: none``."""
    if listener.auth is AuthPolicy.NONE:
        return False
    return tls_active or listener.is_loopback


def _plain_ip(ip: str) -> str:
    """``::ffff:192.0.2.1`` (an IPv4 client of a dual-stack listener) → ``192.0.2.1``, so
    that it matches a client's IPv4 ``networks``."""
    if ":" not in ip:
        return ip  # IPv4 already (parsing it costs more than the rest of the connection set-up)
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return ip


def _peer_unix_user(transport: asyncio.BaseTransport) -> UnixUser | None:
    sock = transport.get_extra_info("socket")
    return None if sock is None else peer_user(sock)


class RelaySMTP(SMTP):
    """One SMTP connection on one listener."""

    def __dir__(self) -> list[str]:
        # aiosmtpd's constructor finds its command and AUTH methods with dir() and
        # inspect.getmembers(), which evaluates every attribute, on every new connection:
        # over a tenth of an accepting process's time. Those methods are all it looks for.
        return hook_names(self)

    def __init__(
        self,
        handler: InboundHandler,
        listener: ListenerConfig,
        *,
        hostname: str,
        starttls_context: ssl.SSLContext | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        over_capacity: Callable[[], bool] = lambda: False,
        on_closed: Callable[[RelaySMTP], None] = lambda smtp: None,
    ) -> None:
        """``over_capacity``: whether this process holds its share of
        ``client_connections.max`` already (the new connection is then turned away)."""
        self.listener = listener
        self.limits = handler.config.client_connections  # the config at connect time
        self.over_capacity = over_capacity
        self.on_closed = on_closed
        super().__init__(
            handler,
            data_size_limit=None,  # SIZE is checked by the handler against the live config
            enable_SMTPUTF8=True,
            hostname=hostname,
            ident="ESMTP relayd",
            tls_context=starttls_context,
            # relayd decides where AUTH is offered (auth_offered); aiosmtpd's own check only
            # knows STARTTLS, not implicit TLS or loopback listeners.
            auth_require_tls=False,
            authenticator=handler.authenticate,
            timeout=self.limits.idle_timeout,
            loop=loop,
        )
        self.relay_handler = handler
        # An instance dict: aiosmtpd's is shared by the class and grows on every EHLO.
        self.command_size_limits = collections.defaultdict(
            lambda: SMTP.command_size_limit, {"MAIL": _MAIL_LINE_LIMIT}
        )
        self.in_data = False  # between 354 and the reply: a shutdown waits for it
        self._deadline = 0.0  # of the idle timeout (see _reset_timeout)
        self._greeted = False
        self._plain_replies = False
        self._silent = True  # nothing heard from the client yet: the short timeout applies
        self._junk = 0  # commands since the last message that moved no mail forward

    # -- connection and session -------------------------------------------------------

    def _create_session(self) -> RelaySession:
        return RelaySession(self.loop, self.listener)

    def _create_envelope(self) -> Transaction:
        return Transaction()

    # Methods, not properties: aiosmtpd's constructor runs inspect.getmembers() on the
    # protocol, which evaluates every property before a session exists.
    def relay_session(self) -> RelaySession:
        assert isinstance(self.session, RelaySession)
        return self.session

    def transaction(self) -> Transaction:
        assert isinstance(self.envelope, Transaction)
        return self.envelope

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Also called again after STARTTLS, with a fresh session (RFC 3207 §4.2).
        first = self.transport is None
        if first and self.over_capacity():
            # Before any session exists: the client hears why, and may come back.
            log.warning("client_connections.max reached: a new connection turned away")
            with contextlib.suppress(Exception):
                transport.write(b"421 4.7.0 Too many connections, try again later\r\n")  # type: ignore[attr-defined]
            transport.close()
            return
        super().connection_made(transport)
        if first:
            self._silent = False  # from the first command on, the idle timeout applies
        session = self.relay_session()
        session.tls = transport.get_extra_info("ssl_object") is not None
        if self.listener.unix_path is not None:
            session.unix_user = _peer_unix_user(transport)
            return
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            session.peer_ip, session.peer_port = _plain_ip(str(peer[0])), int(peer[1])

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_closed(self)
        super().connection_lost(exc)

    def _reset_timeout(self, duration: float | None = None) -> None:
        if duration is None and self._silent:
            # A connection that says nothing at all is no mail client (slowloris, scans).
            duration = self.limits.silent_timeout
        # aiosmtpd cancels and creates a timer for every command (and every DATA block);
        # here one timer per connection is moved forward lazily: it checks the deadline
        # when it fires and sets itself again if the client was active meanwhile.
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._deadline = deadline
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(deadline, self._check_timeout)

    def _check_timeout(self) -> None:
        if self.loop.time() < self._deadline:
            self._timeout_handle = self.loop.call_at(self._deadline, self._check_timeout)
            return
        peer = self.relay_session().peer_text if self.session is not None else "?"
        log.info("%s: timeout, connection closed", peer)
        if not self.in_data and self.transport is not None:
            with contextlib.suppress(Exception):
                self._writer.write(b"421 4.4.2 Timeout exceeded, closing connection\r\n")
        self._timeout_cb()  # type: ignore[no-untyped-call]

    def close_now(self) -> None:
        """End the session as QUIT does (the reply already written is still sent)."""
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()
        if self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """The daemon is stopping: an idle client hears ``421 4.3.2`` (RFC 5321 §3.8), and
        the connection is closed; a message still in DATA never got its 250."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self.in_data:
            # The peer may be gone already; asyncio's TLS transport then fails in odd ways.
            with contextlib.suppress(Exception):
                self._writer.write(b"421 4.3.2 Service shutting down\r\n")
        self.close_now()

    async def push(self, status: AnyStr) -> None:
        # The greeting and the replies to HELO/EHLO carry no enhanced code (RFC 2034 §3).
        if isinstance(status, str) and self._greeted and not self._plain_replies:
            status = with_enhanced_code(status)
        self._greeted = True
        await super().push(status)

    async def handle_exception(self, error: Exception) -> str:
        peer = self.relay_session().peer_text if self.session is not None else "?"
        if isinstance(error, TLSSetupException):
            log.info("%s: TLS handshake failed: %s", peer, error.__cause__ or error)
        else:
            log.error("%s: SMTP session error", peer, exc_info=error)
        return INTERNAL_REPLY  # never the exception text (aiosmtpd's default sends it)

    # -- commands -----------------------------------------------------------------------

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        self._plain_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain_replies = False

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self._set_rset_state()  # type: ignore[no-untyped-call]
        session = self.relay_session()
        session.extended_smtp = True
        session.host_name = hostname
        max_size = advertised_size(self.relay_handler.config)
        lines = [
            self.hostname,
            f"SIZE {max_size}",
            "8BITMIME",
            "SMTPUTF8",
            "PIPELINING",
            "ENHANCEDSTATUSCODES",
        ]
        if self.tls_context is not None and not session.tls:
            lines.append("STARTTLS")
        if auth_offered(self.listener, session.tls):
            lines.append("AUTH PLAIN LOGIN")
        lines.append("HELP")
        reply = "\r\n".join(f"250-{line}" for line in lines[:-1]) + f"\r\n250 {lines[-1]}"
        self._plain_replies = True
        try:
            await self.push(reply)
        finally:
            self._plain_replies = False

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        # AUTH=<mailbox> (RFC 4954 §5) is sent by some authenticated clients; relayd knows
        # the client from its own AUTH and ignores it (aiosmtpd would answer 555).
        if arg:
            head, bracket, params = arg.rpartition(">")
            if bracket:
                arg = head + bracket + _AUTH_PARAM.sub("", params)
        await super().smtp_MAIL(arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        simple = _SIMPLE_PATH.fullmatch(arg)
        if simple is not None:
            # <local@domain> of plain atoms, as nearly every client sends it: aiosmtpd's
            # parser would give the same answer, at a high price per command.
            return simple[1], simple[2]
        address, rest = super()._getaddr(arg)
        # aiosmtpd drops a source route (<@relay:user@dom>) silently, as RFC 5321 §4.1.2 lets
        # a server do; relayd refuses it (an open-relay probe), so it passes it on as sent.
        stripped = arg.lstrip()
        if address is not None and stripped.startswith("<@"):
            end = stripped.find(">")
            if end > 0:
                return stripped[1:end], rest
        return address, rest

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.relay_session().tls:  # aiosmtpd would start a second handshake
            await self.push("503 5.5.1 TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        session = self.relay_session()
        if not auth_offered(self.listener, session.tls):
            if self.listener.auth is AuthPolicy.NONE:
                await self.push("502 5.5.1 AUTH not available")
            else:
                await self.push("538 5.7.11 Encryption required for requested authentication")
            return
        if self.relay_handler.guard.blocked(session.guard_key):
            await self.push("421 4.7.0 Too many failed logins, try again later")
            self.close_now()
            return
        await super().smtp_AUTH(arg)

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if not self.transaction().rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        stream = MessageStream(
            self.relay_handler.open_message(self.relay_session(), self.transaction())
        )
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self.in_data = True
        started = self.loop.time()
        received = 0

        def feed(block: bytes) -> None:
            nonlocal received
            received += len(block)
            stream.feed(block)

        def progress() -> None:
            # The whole section gets idle_timeout, plus a second for every min_data_rate
            # bytes received (Postfix's smtpd_min_data_rate): a client that trickles a
            # byte now and then cannot hold the session, one on a slow link can finish.
            allowed = self.limits.idle_timeout + received / self.limits.min_data_rate
            self._reset_timeout(max(1.0, started + allowed - self.loop.time()))

        try:
            await read_data_section(self._reader, feed, progress)
            reply = await stream.finish()
        finally:
            self.in_data = False
            stream.sink.abort()  # nothing left to abort once committed
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        if reply.startswith("250"):
            self._junk = 0
        await self.push(reply)

    # Commands that move no mail forward; more than client_connections.junk_commands of
    # them since the last message, and the session ends (Postfix's smtpd_junk_command_limit:
    # a NOOP every few minutes must not hold a connection for ever).

    async def _junk_command(self) -> bool:
        self._junk += 1
        if self._junk <= self.limits.junk_commands:
            return False
        await self.push("421 4.7.0 Too many commands without mail, closing connection")
        self.close_now()
        return True

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_NOOP(arg)

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_RSET(arg)

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_VRFY(arg)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str) -> None:
        if not await self._junk_command():
            await super().smtp_HELP(arg)
