"""The SMTP transport: one authenticated connection to an account's provider, reused
across messages (aiosmtplib underneath for the connection, TLS and login).

TLS is never opportunistic: ``implicit`` connects with TLS, ``starttls`` requires the server
to offer STARTTLS and fails (deferring the mail) when it does not — aiosmtplib's default
``start_tls=None`` would silently continue in plain text and send the password. Plain text
only to a loopback upstream marked ``tls: none`` (enforced by the config loader).

Library exceptions are mapped here, at the boundary, into ``AttemptError`` carrying the phase
and either the server's reply or a ``Failure``; ``relayd.core.outcome`` decides what they mean.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl

import aiosmtplib

from relayd.config.model import AccountConfig, TlsMode
from relayd.config.values import is_loopback_host
from relayd.core.outcome import Failure, FailureKind, Phase, Reply
from relayd.errors import SpoolError
from relayd.oauth.xoauth2 import error_challenge_status, xoauth2_response
from relayd.tls import client_context
from relayd.upstream.channel import ReplyChannel
from relayd.upstream.credentials import Credential, CredentialSource, Mechanism
from relayd.upstream.dataphase import ContentSource, send_content
from relayd.upstream.transport import (
    DEFAULT_TIMEOUTS,
    AttemptError,
    Timeouts,
    TransactionResult,
)

__all__ = ["SmtpSession", "login_mechanism"]

log = logging.getLogger(__name__)


def _failure_from(exc: BaseException, phase: Phase) -> Failure:
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 6:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for item in chain:
        if isinstance(item, ssl.SSLCertVerificationError):
            return Failure(
                Phase.TLS, FailureKind.TLS, f"certificate not trusted: {item.verify_message}"
            )
        if isinstance(item, ssl.SSLError):
            return Failure(Phase.TLS, FailureKind.TLS, f"TLS handshake failed: {item.reason}")
    if isinstance(exc, (asyncio.TimeoutError, aiosmtplib.SMTPTimeoutError)):
        return Failure(phase, FailureKind.TIMEOUT, "timed out")
    if isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        return Failure(phase, FailureKind.PROTOCOL, "server disconnected")
    if isinstance(exc, (aiosmtplib.SMTPConnectError, OSError)):
        return Failure(phase, FailureKind.NETWORK, str(exc) or type(exc).__name__)
    return Failure(phase, FailureKind.PROTOCOL, str(exc) or type(exc).__name__)


def login_mechanism(credential: Mechanism, offered: list[str]) -> str | None:
    """The one SASL mechanism to log in with: XOAUTH2 for a token, else PLAIN (RFC 4616; it
    carries UTF-8 credentials, and relayd logs in only over TLS or to a loopback hop), else
    LOGIN; None when the server offers none of them (lower-cased names, as aiosmtplib keeps
    them)."""
    names = {name.lower() for name in offered}
    if credential is Mechanism.XOAUTH2:
        return "xoauth2" if "xoauth2" in names else None
    for name in ("plain", "login"):
        if name in names:
            return name
    return None


# Checked on every command before it is written, as aiosmtplib checks its own (CR, LF, NUL).
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


class SmtpSession:
    """Connect, secure, log in once; then any number of transactions (reused connection)."""

    def __init__(
        self,
        account: AccountConfig,
        *,
        helo_name: str,
        credentials: CredentialSource,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
    ) -> None:
        assert account.smtp is not None
        self.account = account
        self.server = account.smtp
        self.helo_name = helo_name
        self.credentials = credentials
        self.timeouts = timeouts
        self._smtp: aiosmtplib.SMTP | None = None  # for its EHLO data, once logged in
        self._channel: ReplyChannel | None = None  # the connection, once logged in
        self.messages_sent = 0

    @property
    def relay(self) -> str:
        return f"{self.server.host}:{self.server.port}"

    @property
    def is_open(self) -> bool:
        return self._channel is not None and self._channel.is_open

    async def open(self) -> None:
        tls = self.server.tls
        ca = str(self.server.ca_file) if self.server.ca_file else None
        smtp = aiosmtplib.SMTP(
            hostname=self.server.host,
            port=self.server.port,
            local_hostname=self.helo_name,
            use_tls=tls is TlsMode.IMPLICIT,
            # True, never None: STARTTLS is mandatory when configured (not opportunistic).
            start_tls=tls is TlsMode.STARTTLS,
            tls_context=client_context(ca) if tls is not TlsMode.NONE else None,
            timeout=self.timeouts.command,
        )
        phase = Phase.CONNECT
        try:
            await smtp.connect(timeout=self.timeouts.connect)
            phase = Phase.EHLO
            await smtp.ehlo()
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            raise AttemptError(phase, Reply(exc.code, exc.message)) from None
        except aiosmtplib.SMTPException as exc:
            smtp.close()
            if "STARTTLS extension not supported" in str(exc):
                raise AttemptError(
                    Phase.TLS,
                    Failure(Phase.TLS, FailureKind.NO_STARTTLS, "server does not offer STARTTLS"),
                ) from None
            failure = _failure_from(exc, phase)
            raise AttemptError(failure.phase, failure) from None
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            smtp.close()
            failure = _failure_from(exc, phase)
            raise AttemptError(failure.phase, failure) from None
        logx = {"account": self.account.address}
        tls_object = smtp.get_transport_info("ssl_object")
        log.debug(
            "connected to %s (%s), server offers AUTH %s",
            self.relay,
            tls_object.version() if tls_object is not None else "no TLS",
            " ".join(smtp.server_auth_methods) or "-",
            extra=logx,
        )
        try:
            await self._authenticate(smtp)
        except BaseException:
            smtp.close()
            raise
        log.debug("logged in to %s as %s", self.relay, self.account.username, extra=logx)
        try:
            self._channel = ReplyChannel.take_over(smtp)
        except aiosmtplib.SMTPException as exc:
            smtp.close()
            failure = _failure_from(exc, Phase.AUTH)
            raise AttemptError(failure.phase, failure) from None
        self._smtp = smtp

    async def _authenticate(self, smtp: aiosmtplib.SMTP) -> None:
        if (
            not smtp.supports_extension("auth")
            and self.server.tls is TlsMode.NONE
            and is_loopback_host(self.server.host)
        ):
            # A plain loopback upstream (only allowed when the config marks it `tls: none`)
            # is a local MTA hop such as Postfix on 127.0.0.1:25: when it offers no AUTH,
            # there is nobody to log in to. Anywhere else a missing AUTH fails the attempt.
            log.debug("%s offers no AUTH: local hop, sending without login", self.relay)
            return
        credential = await self.credentials.obtain(self.account)
        mechanism = login_mechanism(credential.mechanism, smtp.server_auth_methods)
        if mechanism is None:
            offered = " ".join(smtp.server_auth_methods) or "none"
            wanted = "XOAUTH2" if credential.mechanism is Mechanism.XOAUTH2 else "PLAIN or LOGIN"
            raise AttemptError(
                Phase.AUTH,
                Failure(
                    Phase.AUTH,
                    FailureKind.NO_MECHANISM,
                    f"the server offers no login mechanism for these credentials "
                    f"(AUTH {offered}; relayd logs in with {wanted})",
                ),
            )
        try:
            # One login, with one mechanism: aiosmtplib's login() tries every mechanism the
            # server offers in turn, and a wrong password would then cost two or three
            # refusals per attempt, enough to trip a provider's lockout.
            if mechanism == "xoauth2":
                await self._xoauth2(smtp, credential)
            elif mechanism == "plain":
                await smtp.auth_plain(credential.username, credential.secret)
            else:
                await smtp.auth_login(credential.username, credential.secret)
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code < 400:
                # RFC 4954 §4: 235 is the one success; any other positive reply means the
                # server went off script, and the message was not taken.
                raise AttemptError(
                    Phase.AUTH,
                    Failure(
                        Phase.AUTH,
                        FailureKind.PROTOCOL,
                        f"login failed: AUTH answered {exc.code}, expected 235 "
                        f"({exc.code} {exc.message})",
                    ),
                ) from None
            if exc.code // 100 == 5:  # refused, not "try later" (454)
                self.credentials.rejected(self.account, credential)
            raise AttemptError(Phase.AUTH, Reply(exc.code, exc.message)) from None
        except aiosmtplib.SMTPException as exc:
            failure = _failure_from(exc, Phase.AUTH)
            raise AttemptError(Phase.AUTH, failure) from None
        except (TimeoutError, OSError) as exc:
            raise AttemptError(Phase.AUTH, _failure_from(exc, Phase.AUTH)) from None

    async def _xoauth2(self, smtp: aiosmtplib.SMTP, credential: Credential) -> None:
        """``AUTH XOAUTH2``, ``334``, the response on its own line, ``235`` (see xoauth2)."""
        reply = await smtp.execute_command(b"AUTH", b"XOAUTH2")
        if reply.code != 334:
            raise aiosmtplib.SMTPResponseException(reply.code, reply.message)
        reply = await smtp.execute_command(xoauth2_response(credential.username, credential.secret))
        if reply.code == 334:
            # The token was refused: the JSON error challenge must be answered (with an empty
            # line) before the server sends its final reply.
            status = error_challenge_status(reply.message)
            reply = await smtp.execute_command(b"")
            if reply.code != 235 and status:
                message = f"{reply.message} (token refused, status {status})"
                raise aiosmtplib.SMTPResponseException(reply.code, message)
        if reply.code != 235:
            raise aiosmtplib.SMTPResponseException(reply.code, reply.message)

    async def send(
        self,
        sender: str,
        recipients: tuple[str, ...],
        content: ContentSource,
        *,
        smtputf8: bool = False,
    ) -> TransactionResult:
        """One transaction. Per-recipient replies; raises AttemptError if the session broke.

        MAIL, RCPT and DATA are pipelined when the server offers PIPELINING (RFC 2920); the
        content is streamed (``relayd.upstream.dataphase``): a spooled message is read from
        its file block by block, never held whole.
        """
        smtp, channel = self._smtp, self._channel
        assert smtp is not None and channel is not None, "open() first"
        options = b""
        if smtp.supports_extension("8bitmime"):
            options += b" BODY=8BITMIME"
        if smtputf8 and smtp.supports_extension("smtputf8"):
            options += b" SMTPUTF8"
        if smtp.supports_extension("size"):
            options += b" SIZE=" + str(content.content_length).encode()
        encoding = "utf-8" if smtputf8 else "ascii"
        commands = [b"MAIL FROM:<" + sender.encode(encoding) + b">" + options + b"\r\n"]
        commands += [b"RCPT TO:<" + r.encode(encoding) + b">\r\n" for r in recipients]
        if any(_CONTROL.search(c, 0, len(c) - 2) for c in commands):
            raise ValueError("an address holds a control character")  # never sent as is
        replies: dict[str, tuple[Phase, Reply]] = {}
        try:
            channel.begin()
            mail, rcpt_replies, data = await self._exchange(channel, [*commands, b"DATA\r\n"], smtp)
            accepted: list[str] = []
            for rcpt, resp in zip(recipients, rcpt_replies, strict=True):
                if mail.code != 250:
                    replies[rcpt] = (Phase.MAIL, mail)
                elif resp.code in (250, 251):
                    accepted.append(rcpt)
                else:
                    replies[rcpt] = (Phase.RCPT, resp)
            if data is None or not accepted:
                if data is not None and data.code == 354:
                    # RFC 2920 §3.1: DATA taken with no recipient: end it empty at once.
                    async with asyncio.timeout(self.timeouts.command):
                        channel.write(b".\r\n")
                        await channel.reply()
                await self._reset_quietly(channel)
                return TransactionResult(replies)
            if data.code == 354:
                async with asyncio.timeout(self.timeouts.data):
                    final = await send_content(channel, content)
            else:
                final = data
            if final.code != 250:
                await self._reset_quietly(channel)
            for rcpt in accepted:
                replies[rcpt] = (Phase.DATA, final)
        except SpoolError:
            # The message file, not the server: the connection is dropped without the final
            # dot (the server discards the cut message) and the spool deals with the file.
            self.close()
            raise
        except (TimeoutError, aiosmtplib.SMTPException, OSError) as exc:
            self.close()
            failure = _failure_from(exc, Phase.DATA)
            raise AttemptError(failure.phase, failure) from None
        if any(reply.code == 421 for _, reply in replies.values()):
            self.close()  # the server is closing the session
        self.messages_sent += 1
        return TransactionResult(replies)

    async def _exchange(
        self, channel: ReplyChannel, commands: list[bytes], smtp: aiosmtplib.SMTP
    ) -> tuple[Reply, list[Reply], Reply | None]:
        """Replies to MAIL, to each RCPT, and to DATA (None when DATA was not sent: the
        server does not pipeline and no recipient was accepted). Pipelined in one write
        where the server allows it, else one command at a time as RFC 5321 has it."""
        mail_command, rcpt_commands, data_command = commands[0], commands[1:-1], commands[-1]
        async with asyncio.timeout(self.timeouts.command * 2):
            if smtp.supports_extension("pipelining"):
                channel.write(b"".join(commands))
                mail = await channel.reply()
                rcpts = [await channel.reply() for _ in rcpt_commands]
                return mail, rcpts, await channel.reply()
            channel.write(mail_command)
            mail = await channel.reply()
            if mail.code != 250:
                return mail, [mail for _ in rcpt_commands], None
            rcpts = []
            for command in rcpt_commands:
                channel.write(command)
                rcpts.append(await channel.reply())
            if not any(r.code in (250, 251) for r in rcpts):
                return mail, rcpts, None
            channel.write(data_command)
            return mail, rcpts, await channel.reply()

    async def _reset_quietly(self, channel: ReplyChannel) -> None:
        try:
            async with asyncio.timeout(self.timeouts.command):
                channel.write(b"RSET\r\n")
                await channel.reply()
        except (TimeoutError, aiosmtplib.SMTPException, OSError):
            self.close()

    async def probe(self) -> None:
        """A paused account's probe: log in only (SPEC), then leave."""
        await self.open()
        await self.quit()

    async def quit(self) -> None:
        smtp, channel = self._smtp, self._channel
        self._smtp, self._channel = None, None
        if channel is None:
            if smtp is not None:
                smtp.close()
            return
        log.debug(
            "closing session to %s after %d messages",
            self.relay,
            self.messages_sent,
            extra={"account": self.account.address},
        )
        try:
            async with asyncio.timeout(5):
                channel.write(b"QUIT\r\n")
                await channel.reply()
        except (TimeoutError, aiosmtplib.SMTPException, OSError):
            pass
        channel.close()

    def close(self) -> None:
        smtp, channel = self._smtp, self._channel
        self._smtp, self._channel = None, None
        if channel is not None:
            channel.close()
        elif smtp is not None:
            smtp.close()
