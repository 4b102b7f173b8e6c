"""``clients`` and ``listen``: who may submit, where, and the rules that keep a listener
from becoming an open relay (SPEC "Configuration" listen comments).
"""

from __future__ import annotations

from relayd.config.model import (
    ANONYMOUS,
    AddressPattern,
    AuthPolicy,
    ClientConfig,
    ListenerConfig,
    TlsMode,
)
from relayd.config.values import parse_listen, parse_network, parse_pattern
from relayd.config.yamlnodes import Item, NodeReader
from relayd.passwords import parse_hash

__all__ = [
    "CLIENT_KEYS",
    "LISTEN_KEYS",
    "PATTERN",
    "read_clients",
    "read_listeners",
    "read_patterns",
]

LISTEN_KEYS = ("address", "auth", "tls", "certificate", "private_key", "tls_min_version")
CLIENT_KEYS = ("password_hash", "unix_users", "networks", "may_send_as")
PATTERN = "an address pattern: user@example.com, *@example.com, *@*.example.com or *"


def read_patterns(rd: NodeReader, item: Item) -> tuple[AddressPattern, ...]:
    found = (rd.parsed(i, parse_pattern, PATTERN, trim=True) for i in rd.sequence(item))
    return tuple(p for p in found if p is not None)


def read_clients(rd: NodeReader, item: Item) -> dict[str, ClientConfig]:
    clients = {ANONYMOUS: ClientConfig(ANONYMOUS, None, (), (), ())}
    for name, client_item in rd.mapping(item, None).items():
        f = rd.mapping(client_item, CLIENT_KEYS)
        if name == ANONYMOUS:
            for key in ("password_hash", "unix_users", "networks"):
                if key in f:
                    rd.error(
                        f[key].path,
                        f[key].line,
                        "anonymous is whoever is not identified otherwise; it takes only "
                        "may_send_as (give a named client networks or unix_users instead)",
                    )
        elif not name or any(c.isspace() or ord(c) < 32 for c in name):
            rd.error(
                client_item.path, client_item.line, "a client name (its AUTH login) has no spaces"
            )
        password_hash = rd.text(f["password_hash"], "a hash from `relayd hash-password`")
        if password_hash is not None:
            try:
                parse_hash(password_hash)
            except ValueError as exc:
                # The hash is not echoed: it is as good as a password against offline guessing.
                rd.error(
                    f["password_hash"].path,
                    f["password_hash"].line,
                    f"not a hash made by `relayd hash-password`: {exc}",
                )
        users = (
            rd.text(i, "a Unix user name or uid", trim=True) for i in rd.sequence(f["unix_users"])
        )
        networks = (
            rd.parsed(i, parse_network, "a network like 192.168.10.0/24")
            for i in rd.sequence(f["networks"])
        )
        client = ClientConfig(
            name=name,
            password_hash=password_hash,
            unix_users=tuple(u for u in users if u is not None),
            networks=tuple(n for n in networks if n is not None),
            may_send_as=read_patterns(rd, f["may_send_as"]),
        )
        if name != ANONYMOUS and not (client.password_hash or client.unix_users or client.networks):
            rd.warn(
                client_item.path,
                client_item.line,
                "this client can never be identified: "
                "give it password_hash, unix_users or networks",
            )
        clients[name] = client
    return clients


def read_listeners(
    rd: NodeReader, item: Item, clients: dict[str, ClientConfig]
) -> tuple[ListenerConfig, ...]:
    if not item.present:
        default = ListenerConfig(
            "127.0.0.1",
            2525,
            None,
            AuthPolicy.OPTIONAL,
            TlsMode.NONE,
            None,
            None,
            "1.2",
            "listen (default)",
        )
        return (default,)
    listeners: list[ListenerConfig] = []
    seen: dict[str, str] = {}
    for listener_item in rd.sequence(item):
        listener = _listener(rd, listener_item)
        if listener is None:
            continue
        first = seen.setdefault(listener.display, listener.where)
        if first != listener.where:
            rd.error(listener_item.path, listener_item.line, f"{listener.display} is also {first}")
        _check_listener(rd, listener_item, listener, clients)
        listeners.append(listener)
    return tuple(listeners)


def _listener(rd: NodeReader, item: Item) -> ListenerConfig | None:
    f = rd.record(item, LISTEN_KEYS)
    if f is None:
        return None
    what = "a listen address like 127.0.0.1:2525, [::1]:2525 or unix:/run/relayd/smtp.sock"
    rd.require(f["address"], what)
    address = rd.parsed(f["address"], parse_listen, what, trim=True)
    auth = rd.enum(f["auth"], AuthPolicy) or AuthPolicy.OPTIONAL
    tls = rd.enum(f["tls"], TlsMode) or TlsMode.NONE
    certificate = rd.file_path(f["certificate"], "a PEM file path")
    private_key = rd.file_path(f["private_key"], "a PEM file path")
    min_version = rd.choice(f["tls_min_version"], ("1.2", "1.3")) or "1.2"
    if address is None:
        return None
    unix_path = rd.base_dir / address.unix_path if address.unix_path is not None else None
    return ListenerConfig(
        tcp_host=address.host,
        tcp_port=address.port,
        unix_path=unix_path,
        auth=auth,
        tls=tls,
        certificate=certificate,
        private_key=private_key,
        tls_min_version=min_version,
        where=item.where,
    )


_BEYOND_LOOPBACK_RULE = (
    "a listener beyond loopback needs auth: required with tls: starttls or implicit; or, "
    "for devices that cannot authenticate, clients restricted by networks, "
    "clients.anonymous.may_send_as empty and no AUTH without TLS"
)


def _check_listener(
    rd: NodeReader, item: Item, listener: ListenerConfig, clients: dict[str, ClientConfig]
) -> None:
    if listener.tls is not TlsMode.NONE:
        if listener.unix_path is not None:
            rd.error(item.path, item.line, "a unix socket listener takes tls: none")
        elif listener.certificate is None or listener.private_key is None:
            rd.error(
                item.path, item.line, f"tls: {listener.tls.value} needs certificate and private_key"
            )
    elif listener.certificate is not None or listener.private_key is not None:
        rd.warn(item.path, item.line, "certificate and private_key are not used with tls: none")
    if listener.auth is AuthPolicy.REQUIRED and not any(c.password_hash for c in clients.values()):
        rd.warn(item.path, item.line, "auth: required, but no client has a password_hash")
    if listener.is_loopback:
        return
    encrypted = listener.tls is not TlsMode.NONE
    if listener.auth is AuthPolicy.REQUIRED:
        if not encrypted:
            rd.error(
                item.path,
                item.line,
                f"{listener.display} is reachable beyond loopback without TLS: passwords would "
                f"cross the network in clear text; {_BEYOND_LOOPBACK_RULE}",
            )
        return
    reasons: list[str] = []
    if clients[ANONYMOUS].may_send_as:
        reasons.append("anyone who reaches it could send as clients.anonymous.may_send_as")
    if not any(c.networks for c in clients.values()):
        reasons.append("no client has networks")
    if listener.auth is AuthPolicy.OPTIONAL and not encrypted:
        reasons.append("auth: optional without TLS would take passwords in clear text")
    if reasons:
        rd.error(
            item.path,
            item.line,
            f"{listener.display} is reachable beyond loopback and {'; '.join(reasons)}: "
            f"{_BEYOND_LOOPBACK_RULE}",
        )
