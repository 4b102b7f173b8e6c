"""The configuration as typed, frozen objects.

The YAML is parsed once (``relayd.config.loader``) into these records; no other module ever
sees a raw dict. Every record that a runtime message may need to point back to carries the
YAML path and line it came from.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ANONYMOUS",
    "DEFAULT_STOP_TIMEOUT",
    "AccountConfig",
    "AddressPattern",
    "AlertsConfig",
    "AuthPolicy",
    "ClientConfig",
    "ClientConnections",
    "Config",
    "FleetConfig",
    "ImapServer",
    "Limits",
    "ListenerConfig",
    "MetricsConfig",
    "OAuthConfig",
    "RetryPolicy",
    "Secret",
    "SentCopy",
    "SmtpServer",
    "SpoolConfig",
    "TenantConfig",
    "TlsMode",
    "TransportKind",
    "WebConfig",
]

ANONYMOUS = "anonymous"
DEFAULT_STOP_TIMEOUT = 20.0

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TlsMode(enum.Enum):
    NONE = "none"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


class AuthPolicy(enum.Enum):
    NONE = "none"
    OPTIONAL = "optional"
    REQUIRED = "required"


class TransportKind(enum.Enum):
    """How an account hands its mail to the provider (SPEC "Transports")."""

    SMTP = "smtp"
    GRAPH = "graph"  # Microsoft Graph sendMail
    GMAIL_API = "gmail_api"  # Gmail API messages.send

    @property
    def is_http_api(self) -> bool:
        return self is not TransportKind.SMTP


class SentCopy(enum.Enum):
    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"


@dataclass(frozen=True)
class Secret:
    """A secret value, already read from its source at load time.

    ``repr`` and ``str`` never show the value: these objects end up in tracebacks and logs.
    """

    value: str = field(repr=False)
    source: str  # "env:NAME", "file:PATH", "credential:NAME" or "literal" — safe to print

    def reveal(self) -> str:
        return self.value

    def __str__(self) -> str:
        return f"<secret from {self.source}>"


@dataclass(frozen=True)
class AddressPattern:
    """An address pattern of SPEC: ``user@dom``, ``*@dom``, ``*@*.dom`` or ``*``.

    Case-insensitive. A bare local part (``root``, only in ``rewrite_senders``) has no "@".
    """

    text: str  # lower-cased

    def matches(self, address: str) -> bool:
        address = address.lower()
        if self.text == "*":
            return True
        local, _, domain = self.text.rpartition("@")
        a_local, at, a_domain = address.rpartition("@")
        if not at:
            return False
        if local != "*" and local != a_local:
            return False
        if domain.startswith("*."):
            return a_domain.endswith(domain[1:])
        return domain == a_domain


@dataclass(frozen=True)
class ListenerConfig:
    tcp_host: str | None  # None for a unix socket
    tcp_port: int | None
    unix_path: Path | None
    auth: AuthPolicy
    tls: TlsMode
    certificate: Path | None
    private_key: Path | None
    tls_min_version: str  # "1.2" or "1.3"
    where: str  # "listen[0]: line 3", for messages

    @classmethod
    def local(cls, unix_path: Path, where: str) -> ListenerConfig:
        """relayd's own way in for local users (``submit.sock``, the maildrop): no AUTH and
        no TLS, the identity being the peer's uid."""
        return cls(None, None, unix_path, AuthPolicy.NONE, TlsMode.NONE, None, None, "1.2", where)

    @property
    def is_loopback(self) -> bool:
        if self.unix_path is not None:
            return True
        assert self.tcp_host is not None
        if self.tcp_host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.tcp_host).is_loopback
        except ValueError:
            return False

    @property
    def display(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = f"[{self.tcp_host}]" if self.tcp_host and ":" in self.tcp_host else self.tcp_host
        return f"{host}:{self.tcp_port}"


@dataclass(frozen=True)
class ClientConfig:
    name: str
    password_hash: str | None
    unix_users: tuple[str, ...]
    networks: tuple[IPNetwork, ...]
    may_send_as: tuple[AddressPattern, ...]

    def may_send_as_address(self, address: str) -> bool:
        return any(p.matches(address) for p in self.may_send_as)


@dataclass(frozen=True)
class RetryPolicy:
    first: float  # seconds
    max: float
    give_up_after: float


@dataclass(frozen=True)
class SpoolConfig:
    max_message_size: int
    retry: RetryPolicy
    delay_warning: float  # seconds, 0 = off
    encrypt_at_rest: bool
    key: Secret | None


@dataclass(frozen=True)
class ClientConnections:
    """Limits on the connections of local applications, all listeners together: defaults no
    legacy application meets, which still bound what a runaway one or a slowloris holds."""

    max: int = 1000  # open at once; one more hears 421 4.7.0 and is closed
    # RFC 5321 §4.5.3.2.7: a server should wait at least 5 minutes for the next command.
    idle_timeout: float = 300.0
    # A connection that sends nothing at all after the greeting is no mail client.
    silent_timeout: float = 60.0
    # DATA must come at least this fast (bytes/s) once it has taken idle_timeout, as
    # Postfix's smtpd_min_data_rate: a trickle cannot hold a session for ever.
    min_data_rate: int = 500
    # Commands outside a transaction (NOOP, RSET, HELP ...) before 421, as Postfix's
    # smtpd_junk_command_limit.
    junk_commands: int = 100


@dataclass(frozen=True)
class SmtpServer:
    host: str
    port: int
    tls: TlsMode
    ca_file: Path | None


@dataclass(frozen=True)
class ImapServer:
    host: str
    port: int
    tls: TlsMode
    ca_file: Path | None
    username: str | None
    password: Secret | None
    sent_folder: str | None


@dataclass(frozen=True)
class Limits:
    max_connections: int = 3
    max_messages_per_minute: int = 0  # 0 = no limit
    max_recipients: int = 0  # 0 = no limit


@dataclass(frozen=True)
class OAuthConfig:
    flow: str  # delegated | client_credentials | service_account | refresh_token
    client_id: str | None = None
    tenant_id: str | None = None
    client_secret: Secret | None = None
    certificate: Secret | None = None
    thumbprint: str | None = None
    service_account_key: Secret | None = None
    token_url: str | None = None
    # RFC 7009 token revocation, used by `relayd auth --revoke` (Google's by default).
    revoke_url: str | None = None
    refresh_token: Secret | None = None
    scopes: tuple[str, ...] = ()
    authority: str | None = None
    ca_file: Path | None = None


@dataclass(frozen=True)
class AccountConfig:
    """One mailbox relayd logs in as. Routes resolve to these."""

    address: str  # lower-cased
    tenant: str
    provider: str
    username: str
    password: Secret | None
    oauth: OAuthConfig | None
    smtp: SmtpServer | None  # None only for the capture provider
    imap: ImapServer | None
    limits: Limits
    sent_copy: SentCopy
    from_name: str | None
    aliases: tuple[str, ...]  # lower-cased
    capture_path: Path | None  # the Maildir of the capture provider
    where: str  # "tenants.acme.accounts[1]: line 40"
    # ``password: {connect: true}``: the app password is not in the config; the mailbox owner
    # gives it on the web connect page, and it is kept encrypted in the state directory.
    connect_password: bool = False
    transport: TransportKind = TransportKind.SMTP
    # The HTTP API's base URL (graph_url / gmail_url) when ``transport`` is an API.
    api_url: str | None = None

    @property
    def is_capture(self) -> bool:
        return self.provider == "capture"

    def owns(self, address: str) -> bool:
        address = address.lower()
        return address == self.address or address in self.aliases


@dataclass(frozen=True)
class TenantConfig:
    name: str
    provider: str
    domains: tuple[AddressPattern, ...]  # "*@example.com" style patterns built from `domains:`
    accounts: tuple[AccountConfig, ...]
    # The template an address routed by `domains:` gets (app-only OAuth or capture).
    domain_account: AccountConfig | None
    where: str
    alerts: AlertsConfig | None = None  # the tenant's own channels, besides the top-level ones


@dataclass(frozen=True)
class AlertsConfig:
    via: str | None  # the account that sends the alert emails
    email: str | None
    webhook: Secret | None  # a secret value: a webhook URL is often its own credential


@dataclass(frozen=True)
class MetricsConfig:
    address: str
    port: int


@dataclass(frozen=True)
class FleetConfig:
    """Fleet mode (SPEC "Fleet"): tokens, health and budgets shared through PostgreSQL."""

    database: Secret  # a PostgreSQL URL with its password: never logged
    name: str  # this host, as the other hosts and `relayd status` see it
    lease_time: float  # a dead host's connection leases come back after this long
    where: str


@dataclass(frozen=True)
class WebConfig:
    """The web listener (SPEC "Web"): connect links, the operator page, metrics."""

    address: str
    port: int
    public_url: str  # no trailing slash: links are public_url + "/connect/..."
    admins: dict[str, str]  # operator name -> scrypt hash (`relayd hash-password`)
    certificate: Path | None  # both set: HTTPS; else plain HTTP (loopback only)
    private_key: Path | None
    where: str

    @property
    def tls(self) -> bool:
        return self.certificate is not None and self.private_key is not None


@dataclass(frozen=True)
class Config:
    source: Path
    state_directory: Path
    helo_name: str
    log_level: str
    listeners: tuple[ListenerConfig, ...]
    clients: dict[str, ClientConfig]
    rewrite_senders: tuple[tuple[AddressPattern, str], ...]
    spool: SpoolConfig
    tokens_key: Secret | None
    tenants: tuple[TenantConfig, ...]
    alerts: AlertsConfig | None
    metrics: MetricsConfig | None
    warnings: tuple[str, ...] = ()
    # Processes accepting SMTP beside the main one (which alone schedules delivery);
    # None: one per CPU plus one; 0: the main process accepts itself.
    accept_processes: int | None = None
    client_connections: ClientConnections = field(default_factory=ClientConnections)
    # How long a SIGTERM may take, all of it: well under systemd's TimeoutStopSec (45 s in
    # the shipped unit), so that nothing is killed by systemd in the middle of a write.
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    web: WebConfig | None = None
    fleet: FleetConfig | None = None

    def accounts(self) -> tuple[AccountConfig, ...]:
        return tuple(a for t in self.tenants for a in t.accounts)

    def secret_values(self) -> list[str]:
        """Every secret value in the config, for the log redactor."""
        found: list[str] = []
        _collect_secrets(self, found, set())
        return found


def _collect_secrets(value: Any, found: list[str], seen: set[int]) -> None:
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, Secret):
        found.append(value.reveal())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _collect_secrets(getattr(value, f.name), found, seen)
    elif isinstance(value, dict):
        for item in value.values():
            _collect_secrets(item, found, seen)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect_secrets(item, found, seen)
