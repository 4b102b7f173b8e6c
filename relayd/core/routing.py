"""Who is submitting, as whom they may send, and which account carries the message.

Pure policy over the loaded config (SPEC "Routing and who may send as whom"): no sockets, no
files. The inbound server asks these questions at AUTH, MAIL FROM and end of DATA so that an
application hears a refusal at once, before anything is spooled.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from relayd.config.model import ANONYMOUS, AccountConfig, ClientConfig, Config

__all__ = [
    "Refusal",
    "RouteDecision",
    "UnixUser",
    "check_address_syntax",
    "decide_route",
    "find_account",
    "identify_client",
    "known_accounts",
    "rewrite_sender",
]


@dataclass(frozen=True)
class Refusal:
    """An SMTP reply refusing the sender; nothing is spooled."""

    reply: str


@dataclass(frozen=True)
class UnixUser:
    """A local client known by its uid: the peer of a unix listener (SO_PEERCRED), the owner
    of a maildrop file. ``unix_users`` names it by user name or by uid; ``name`` is None for
    a uid without a passwd entry (a container's, a removed user's), which only its uid can
    name."""

    uid: int
    name: str | None

    def __str__(self) -> str:
        return self.name if self.name is not None else f"uid {self.uid}"

    def named_in(self, entries: tuple[str, ...]) -> bool:
        return str(self.uid) in entries or (self.name is not None and self.name in entries)


@dataclass(frozen=True)
class RouteDecision:
    sender: str  # after rewrite_senders
    account: AccountConfig


def identify_client(
    config: Config,
    *,
    login: str | None = None,
    unix_user: UnixUser | None = None,
    peer_ip: str | None = None,
) -> ClientConfig:
    """SPEC routing rule 1: AUTH login, else Unix user, else `networks`, else anonymous."""
    if login is not None:
        return config.clients[login]
    if unix_user is not None:
        for client in config.clients.values():
            if unix_user.named_in(client.unix_users):
                return client
    if peer_ip is not None and any(client.networks for client in config.clients.values()):
        try:
            ip = ipaddress.ip_address(peer_ip)
        except ValueError:
            ip = None
        if ip is not None:
            for client in config.clients.values():
                if any(ip in net for net in client.networks):
                    return client
    return config.clients[ANONYMOUS]


def _is_local_form(address: str, local_hostnames: frozenset[str]) -> bool:
    _local, at, domain = address.rpartition("@")
    return not at or domain.lower() in local_hostnames


def rewrite_sender(config: Config, sender: str, local_hostnames: frozenset[str]) -> str:
    """SPEC routing rule 2: cron and friends send as `root` or `user@localhost`.

    A rule written as a bare local part (``"root"``) matches ``root``, ``root@localhost`` and
    ``root@<this host>``; other patterns match as address patterns.
    """
    for pattern, replacement in config.rewrite_senders:
        text = pattern.text
        if "@" not in text and text != "*":
            local = sender.rpartition("@")[0] if "@" in sender else sender
            if local.lower() == text and _is_local_form(sender, local_hostnames):
                return replacement
            continue
        candidate = sender if "@" in sender else f"{sender}@localhost"
        if pattern.matches(candidate):
            return replacement
    return sender


def find_account(config: Config, sender: str) -> AccountConfig | None:
    """SPEC routing rule 4: an account's address or alias, else a tenant's `domains`."""
    sender = sender.lower()
    for tenant in config.tenants:
        for account in tenant.accounts:
            if account.owns(sender):
                return account
    for tenant in config.tenants:
        if tenant.domain_account is None:
            continue
        if any(p.matches(sender) for p in tenant.domains):
            return dataclasses.replace(
                tenant.domain_account,
                address=sender,
                username=tenant.domain_account.username or sender,
            )
    return None


def known_accounts(config: Config, seen: Iterable[str]) -> tuple[AccountConfig, ...]:
    """The configured accounts, then every address in ``seen`` that a tenant's `domains:`
    routes (app-only OAuth, service accounts, capture), each as the account it is sent by.

    Senders routed by domain have no entry in the config, only in what relayd has seen
    (account health, the spool); they are accounts all the same for status, STATUS=,
    metrics and reminders. An address no longer routed, or an alias, is left out."""
    configured = config.accounts()
    listed = {a.address for a in configured}
    found: list[AccountConfig] = []
    for address in sorted({s.lower() for s in seen} - listed):
        account = find_account(config, address)
        if account is not None and account.address == address:
            found.append(account)
    return configured + tuple(found)


def decide_route(
    config: Config,
    client: ClientConfig,
    sender: str,
    local_hostnames: frozenset[str],
) -> RouteDecision | Refusal:
    """Decide at MAIL FROM: rewrite, check `may_send_as`, pick the account."""
    if sender == "":
        # relayd writes its own DSNs; a client's null sender could be used to send as nobody.
        return Refusal("550 5.7.1 Null sender not accepted from clients")
    rewritten = rewrite_sender(config, sender, local_hostnames)
    if "@" not in rewritten:
        return Refusal(f"550 5.7.1 <{sender}>: sender must be a full address")
    bad_form = check_address_syntax(rewritten)
    if bad_form is not None:
        return bad_form
    if not client.may_send_as_address(rewritten):
        return Refusal(
            f"550 5.7.1 <{rewritten}>: client {client.name} may not send as this address"
        )
    account = find_account(config, rewritten)
    if account is None:
        return Refusal(f"550 5.7.1 <{rewritten}>: sender not configured")
    return RouteDecision(sender=rewritten, account=account)


def check_address_syntax(address: str) -> Refusal | None:
    """Refuse the address forms used to trick relays into forwarding mail.

    nmap's smtp-open-relay probes use source routes (``@host:user@dom``, RFC 5321 §4.1.2
    tolerates them on input only), the percent hack (``user%dom@host``), bang paths
    (``dom!user@host``), several ``@``, and IP literals. A submission relay for known
    senders needs none of them, so they are refused outright rather than interpreted.
    """
    if address.startswith("@") or ":" in address.partition("@")[0]:
        return Refusal("553 5.1.3 Source routes are not accepted")
    if address.count("@") != 1:
        return Refusal(f"553 5.1.3 <{address}>: expected exactly one @")
    local, _, domain = address.rpartition("@")
    if not local or not domain:
        return Refusal(f"553 5.1.3 <{address}>: malformed address")
    if "%" in local or "!" in local or local.startswith('"'):
        return Refusal(f"553 5.1.3 <{address}>: address form not accepted")
    if domain.startswith("[") or any(c in domain for c in ' \\"<>()[],;:'):
        return Refusal(f"553 5.1.3 <{address}>: domain literal or invalid domain")
    return None
