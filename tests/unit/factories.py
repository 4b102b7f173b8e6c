"""Builders for the frozen config records and spool envelopes, for unit tests.

They build the same shapes the loader produces (lower-cased patterns, ``*@dom`` patterns for
``domains:``, a domain template account with an empty address and username, a bare local part
kept as a pattern without "@"), without YAML, files or secrets on disk.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from pathlib import Path

from relayd.config.model import (
    ANONYMOUS,
    AccountConfig,
    AddressPattern,
    AlertsConfig,
    ClientConfig,
    Config,
    Limits,
    OAuthConfig,
    RetryPolicy,
    Secret,
    SentCopy,
    SmtpServer,
    SpoolConfig,
    TenantConfig,
    TlsMode,
)
from relayd.core.envelope import Envelope
from relayd.core.queues import MOVES, Queue
from relayd.spool.store import Spool

__all__ = [
    "DEFAULT_RETRY",
    "domain_pattern",
    "make_account",
    "make_client",
    "make_config",
    "make_domain_template",
    "make_envelope",
    "make_tenant",
    "pattern",
    "place",
    "rewrite_rules",
]

#: SPEC defaults: retry {first: 5m, max: 1h, give_up_after: 5d}.
DEFAULT_RETRY = RetryPolicy(first=300.0, max=3600.0, give_up_after=5 * 86400.0)


def pattern(text: str) -> AddressPattern:
    """An address pattern as the loader stores it (lower-cased)."""
    return AddressPattern(text.lower())


def domain_pattern(text: str) -> AddressPattern:
    """A ``domains:`` entry: ``example.com`` → ``*@example.com``, ``*`` → ``*``."""
    lowered = text.lower()
    return AddressPattern("*" if lowered == "*" else "*@" + lowered)


def rewrite_rules(rules: Mapping[str, str]) -> tuple[tuple[AddressPattern, str], ...]:
    """``rewrite_senders:`` in file order; a bare local part stays a pattern without "@"."""
    return tuple((pattern(key), target) for key, target in rules.items())


def make_account(
    address: str,
    *,
    tenant: str = "acme",
    provider: str = "custom",
    username: str | None = None,
    aliases: Iterable[str] = (),
    password: str | None = "app-password",
    oauth: OAuthConfig | None = None,
    capture_path: Path | None = None,
    limits: Limits | None = None,
) -> AccountConfig:
    is_capture = provider == "capture"
    if is_capture and capture_path is None:
        capture_path = Path("/nonexistent/capture")
    return AccountConfig(
        address=address.lower(),
        tenant=tenant,
        provider=provider,
        username=address if username is None else username,
        password=None if password is None or is_capture else Secret(password, "literal"),
        oauth=oauth,
        smtp=None if is_capture else SmtpServer("smtp.test.example", 465, TlsMode.IMPLICIT, None),
        imap=None,
        limits=limits or Limits(),
        sent_copy=SentCopy.AUTO,
        from_name=None,
        aliases=tuple(a.lower() for a in aliases),
        capture_path=capture_path,
        where=f"tenants.{tenant}.accounts: line 1",
    )


def make_domain_template(tenant: str, *, provider: str = "microsoft365") -> AccountConfig:
    """The account a sender routed by ``domains:`` gets: no address, no username."""
    oauth = None
    if provider != "capture":
        oauth = OAuthConfig(
            flow="client_credentials",
            client_id="00000000-0000-0000-0000-000000000000",
            tenant_id=f"{tenant}.example",
            client_secret=Secret("s3cret", "literal"),
        )
    return make_account(
        "", tenant=tenant, provider=provider, username="", password=None, oauth=oauth
    )


def make_tenant(
    name: str,
    *,
    provider: str = "custom",
    accounts: Iterable[AccountConfig] = (),
    domains: Iterable[str] = (),
    domain_account: AccountConfig | None = None,
    alerts: AlertsConfig | None = None,
) -> TenantConfig:
    patterns = tuple(domain_pattern(d) for d in domains)
    if patterns and domain_account is None:
        domain_account = make_domain_template(name, provider=provider)
    return TenantConfig(
        name=name,
        provider=provider,
        domains=patterns,
        accounts=tuple(accounts),
        domain_account=domain_account,
        where=f"tenants.{name}: line 1",
        alerts=alerts,
    )


def make_client(
    name: str,
    *,
    may_send_as: Iterable[str] = (),
    unix_users: Iterable[str] = (),
    networks: Iterable[str] = (),
    password_hash: str | None = None,
) -> ClientConfig:
    return ClientConfig(
        name=name,
        password_hash=password_hash,
        unix_users=tuple(unix_users),
        networks=tuple(ipaddress.ip_network(n) for n in networks),
        may_send_as=tuple(pattern(p) for p in may_send_as),
    )


def make_config(
    *,
    clients: Iterable[ClientConfig] = (),
    tenants: Iterable[TenantConfig] = (),
    rewrite_senders: Mapping[str, str] | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    state_directory: Path = Path("/nonexistent/state"),
    helo_name: str = "app01.acme.example",
    alerts: AlertsConfig | None = None,
) -> Config:
    """A Config; an ``anonymous`` client that may send as nothing is added if none is given."""
    by_name = {c.name: c for c in clients}
    by_name.setdefault(ANONYMOUS, make_client(ANONYMOUS))
    return Config(
        source=Path("/nonexistent/relayd.yaml"),
        state_directory=state_directory,
        helo_name=helo_name,
        log_level="info",
        listeners=(),
        clients=by_name,
        rewrite_senders=rewrite_rules(rewrite_senders or {}),
        spool=SpoolConfig(
            max_message_size=35 * 2**20,
            retry=retry,
            delay_warning=0.0,
            encrypt_at_rest=False,
            key=None,
        ),
        tokens_key=None,
        tenants=tuple(tenants),
        alerts=alerts,
        metrics=None,
    )


_counter = iter(range(1, 1 << 62))


def make_envelope(
    *,
    queue_id: str | None = None,
    recipients: Iterable[str] = ("bob@example.net",),
    sender: str = "alice@acme.example",
    received_at: float = 1_700_000_000.0,
    account: str = "alice@acme.example",
    tenant: str = "acme",
    is_dsn: bool = False,
    smtputf8: bool = False,
) -> Envelope:
    """An envelope with a unique, deterministic queue id unless one is given."""
    return Envelope(
        queue_id=queue_id or f"0000TEST{next(_counter):012X}",
        received_at=received_at,
        client="crm",
        peer="127.0.0.1:40112",
        sender=sender,
        recipients=tuple(recipients),
        account=account,
        tenant=tenant,
        is_dsn=is_dsn,
        smtputf8=smtputf8,
    )


def place(spool: Spool, queue_id: str, queue: Queue | str) -> None:
    """Move a message just received into ``incoming/`` on to ``queue``, by the moves the
    spool allows (relayd.core.queues): through ``active/`` where the scheduler would."""
    target = Queue(queue)
    if target is Queue.INCOMING:
        return
    if target in MOVES[Queue.INCOMING]:
        spool.move(queue_id, Queue.INCOMING, target)
        return
    spool.move(queue_id, Queue.INCOMING, Queue.ACTIVE)
    if target is not Queue.ACTIVE:
        spool.move(queue_id, Queue.ACTIVE, target)
