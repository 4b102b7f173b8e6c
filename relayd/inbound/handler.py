"""Per-transaction policy of the SMTP server, as an aiosmtpd handler.

Who the client is (AUTH login, Unix user, network, else anonymous), whether it may send as
the envelope sender and through which account (decided at MAIL FROM, so the application
hears it at once), which recipient forms are accepted, and how an accepted message becomes a
spool file. The protocol itself (reading DATA, TLS, EHLO) is ``relayd.inbound.server``.

The config is read from ``self.config`` once per transaction (at MAIL FROM) and kept with
the transaction, so a reload (which replaces ``self.config``) never changes the rules in the
middle of a message.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import socket
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import AuthResult, LoginPassword, Session
from aiosmtpd.smtp import Envelope as SMTPEnvelope

from relayd.config.apis import size_limit
from relayd.config.model import ANONYMOUS, AuthPolicy, ClientConfig, Config, ListenerConfig
from relayd.core.routing import (
    Refusal,
    RouteDecision,
    UnixUser,
    check_address_syntax,
    decide_route,
    identify_client,
)
from relayd.inbound.data import SIZE_REPLY
from relayd.inbound.guard import LoginGuard
from relayd.inbound.submission import MessageSink, OnQueued, Submission
from relayd.passwords import verify_password
from relayd.spool.store import Spool

__all__ = [
    "CredentialCheck",
    "InboundHandler",
    "RelaySession",
    "Transaction",
    "hook_names",
    "local_hostnames",
]

log = logging.getLogger("relayd.inbound")

# Postfix's smtpd_recipient_limit; RFC 5321 §4.5.3.1.8 asks for at least 100.
MAX_RECIPIENTS = 1000


_HOOK_PREFIXES = ("smtp_", "auth_", "handle_")
_HOOK_NAMES: dict[type, list[str]] = {}


def hook_names(obj: object) -> list[str]:
    """The names aiosmtpd looks for on its protocol and handler (``smtp_*``, ``auth_*``,
    ``handle_*``), worked out once per class."""
    cls = type(obj)
    names = _HOOK_NAMES.get(cls)
    if names is None:
        names = _HOOK_NAMES[cls] = [n for n in dir(cls) if n.startswith(_HOOK_PREFIXES)]
    return names


def local_hostnames(config: Config) -> frozenset[str]:
    """Names under which local senders like ``root@<this host>`` are rewritten (SPEC rule 2)."""
    names = {"localhost", "localhost.localdomain", socket.gethostname(), socket.getfqdn()}
    if config.helo_name:
        names.add(config.helo_name)
    return frozenset(n.lower() for n in names if n)


class RelaySession(Session):
    """aiosmtpd's session, plus who is at the other end of the connection."""

    def __init__(self, loop: Any, listener: ListenerConfig) -> None:
        super().__init__(loop)
        self.listener = listener
        self.peer_ip: str | None = None
        self.peer_port: int | None = None
        self.unix_user: UnixUser | None = None  # from SO_PEERCRED on a unix listener
        self.tls = False
        self.login: str | None = None  # the client name, after a successful AUTH

    @property
    def peer_text(self) -> str:
        if self.peer_ip is None:
            return "unix"
        if ":" in self.peer_ip:
            return f"[{self.peer_ip}]:{self.peer_port}"
        return f"{self.peer_ip}:{self.peer_port}"

    @property
    def guard_key(self) -> str:
        """Failed logins are counted per peer address (all unix-socket peers are one)."""
        return self.peer_ip or "unix"

    # aiosmtpd sets login_data after every AUTH and its property logs a deprecation warning
    # each time; relayd keeps the login in ``login`` and wants no such noise.
    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class Transaction(SMTPEnvelope):
    """aiosmtpd's envelope, plus the decisions taken at MAIL FROM."""

    def __init__(self) -> None:
        super().__init__()
        self.config: Config | None = None
        self.client: ClientConfig | None = None
        self.route: RouteDecision | None = None
        self.original_sender = ""


class CredentialCheck:
    """Password verification with a memory of successes.

    aiosmtpd's authenticator is synchronous, so scrypt runs on the event loop; remembering
    logins that verified (under an HMAC with a per-process random key, never the password
    itself) keeps a busy client from costing one scrypt per connection. The hash is part of
    the key, so a changed ``password_hash`` (reload) is verified afresh.
    """

    def __init__(
        self, verify: Callable[[str, str], bool] = verify_password, max_entries: int = 1024
    ) -> None:
        self._verify = verify
        self._max_entries = max_entries
        self._secret = secrets.token_bytes(32)
        self._verified: set[bytes] = set()

    def check(self, login: str, password: str, encoded: str) -> bool:
        material = "\0".join((login, password, encoded)).encode("utf-8", "surrogateescape")
        key = hmac.new(self._secret, material, hashlib.sha256).digest()
        if key in self._verified:
            return True
        if not self._verify(password, encoded):
            return False
        if len(self._verified) >= self._max_entries:
            self._verified.clear()
        self._verified.add(key)
        return True


def _size_param(mail_options: list[str]) -> int | None:
    """``SIZE=n`` of MAIL FROM (RFC 1870); aiosmtpd has checked it is all digits."""
    for option in mail_options:
        name, _, value = option.partition("=")
        if name.upper() == "SIZE" and value.isdigit():
            return int(value)
    return None


class InboundHandler:
    """The aiosmtpd handler shared by every listener and connection of one process."""

    def __dir__(self) -> list[str]:
        # What aiosmtpd's per-connection introspection looks for (see RelaySMTP.__dir__).
        return hook_names(self)

    def __init__(
        self,
        config: Config,
        spool: Spool,
        on_queued: OnQueued,
        local_hostnames: frozenset[str],
        *,
        guard: LoginGuard | None = None,
        verify: Callable[[str, str], bool] = verify_password,
    ) -> None:
        """``on_queued(queue id, account)``: told once a message is durable (in an
        accepting process, the announcement to the main process, which then need not open
        the file to know the message's lane)."""
        self.config = config  # replaced on reload; read once per transaction
        self.spool = spool
        self.on_queued = on_queued
        self.local_hostnames = local_hostnames
        self.guard = guard if guard is not None else LoginGuard()
        self.credentials = CredentialCheck(verify)

    # -- aiosmtpd hooks ----------------------------------------------------------------

    async def handle_MAIL(
        self,
        server: Any,
        session: RelaySession,
        envelope: Transaction,
        address: str,
        mail_options: list[str],
    ) -> str:
        config = self.config
        if session.listener.auth is AuthPolicy.REQUIRED and not session.authenticated:
            return "530 5.7.0 Authentication required"
        size = _size_param(mail_options)
        if size is not None and size > config.spool.max_message_size:
            return SIZE_REPLY
        sender = "" if address == "<>" else address  # aiosmtpd hands the null path over as "<>"
        try:
            client = identify_client(
                config,
                login=session.login,
                unix_user=session.unix_user,
                peer_ip=session.peer_ip,
            )
        except KeyError:  # the login's client was removed by a reload
            return "550 5.7.1 Client is no longer configured"
        decision = decide_route(config, client, sender, self.local_hostnames)
        if isinstance(decision, Refusal):
            log.info(
                "%s: MAIL refused: client=%s from=<%s>: %s",
                session.peer_text,
                client.name,
                sender,
                decision.reply,
            )
            return decision.reply
        limit, size_reply = size_limit(decision.account, config.spool.max_message_size)
        if size is not None and size > limit:
            return size_reply or SIZE_REPLY  # RFC 1870 §6.1: the declared size is too big
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.config = config
        envelope.client = client
        envelope.route = decision
        envelope.original_sender = sender
        log.debug(
            "%s: MAIL FROM:<%s> client=%s route=%s (tenant %s)",
            session.peer_text,
            sender,
            client.name,
            decision.account.address,
            decision.account.tenant,
        )
        return f"250 2.1.0 Sender <{sender}> ok"

    async def handle_RCPT(
        self,
        server: Any,
        session: RelaySession,
        envelope: Transaction,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        # Any recipient is fine for a sender that passed MAIL FROM: the open-relay guard is
        # the sender check. The forms relay probes use are refused outright.
        refusal = check_address_syntax(address)
        if refusal is not None:
            return refusal.reply
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        if address.lower() not in (r.lower() for r in envelope.rcpt_tos):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        log.debug("%s: RCPT TO:<%s>", session.peer_text, address)
        return f"250 2.1.5 Recipient <{address}> ok"

    def authenticate(
        self,
        server: Any,
        session: Session,
        envelope: SMTPEnvelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        """aiosmtpd's ``authenticator``: the login is a client name with a password_hash."""
        assert isinstance(session, RelaySession)
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode("utf-8", "surrogateescape")
        password = auth_data.password.decode("utf-8", "surrogateescape")
        client = self.config.clients.get(login)
        if (
            client is None
            or client.name == ANONYMOUS
            or client.password_hash is None
            or not self.credentials.check(login, password, client.password_hash)
        ):
            self.guard.failed(session.guard_key)
            # The login is not logged: users type passwords into the wrong field.
            log.warning("%s: AUTH %s failed", session.peer_text, mechanism)
            return AuthResult(success=False, handled=False)
        session.login = client.name
        log.info("%s: AUTH %s as %s", session.peer_text, mechanism, client.name)
        return AuthResult(success=True, auth_data=client.name)

    # -- DATA ----------------------------------------------------------------------------

    def open_message(self, session: RelaySession, envelope: Transaction) -> MessageSink:
        """The sink for the content of an accepted transaction (after its RCPTs)."""
        config, client, route = envelope.config, envelope.client, envelope.route
        assert config is not None and client is not None and route is not None
        submission = Submission(
            config=config,
            client=client,
            route=route,
            original_sender=envelope.original_sender,
            recipients=tuple(envelope.rcpt_tos),
            peer=session.peer_text,
            smtputf8=bool(envelope.smtp_utf8),
            local_hostnames=self.local_hostnames,
        )
        return MessageSink(submission, self.spool, self.on_queued)
