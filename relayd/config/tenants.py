"""``tenants:`` → TenantConfig / AccountConfig, following SPEC "Where keys go".

A preset fills defaults, the tenant overrides them and each account overrides its tenant;
``smtp``, ``imap``, ``oauth`` and ``limits`` merge key by key (see ``settings``). Every sender
address belongs to one account only, and every domain to one tenant, so a route is never
ambiguous (SPEC "Routing", step 4).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from yaml.nodes import MappingNode

from relayd.config.alerts import read_alerts
from relayd.config.apis import (
    DEFAULT_URLS,
    GRAPH_MAX_CONCURRENT,
    TRANSPORT_LABELS,
    base_limits,
    transport_scopes,
)
from relayd.config.model import (
    AccountConfig,
    AddressPattern,
    OAuthConfig,
    Secret,
    SentCopy,
    TenantConfig,
    TransportKind,
)
from relayd.config.presets import APP_ONLY_FLOWS, PRESETS, Preset
from relayd.config.secrets import read_secret
from relayd.config.settings import (
    IMAP_KEYS,
    SMTP_KEYS,
    LimitsLayer,
    OAuthLayer,
    ServerLayer,
    build_imap,
    build_limits,
    build_oauth,
    build_smtp,
    overlay,
    preset_server,
    read_limits,
    read_oauth,
    read_server,
)
from relayd.config.values import parse_address, parse_domain_pattern, parse_url
from relayd.config.yamlnodes import Fields, Item, NodeReader

__all__ = ["ACCOUNT_KEYS", "TENANT_KEYS", "read_tenants"]

TENANT_KEYS = (
    "provider",
    "domains",
    "smtp",
    "imap",
    "oauth",
    "limits",
    "sent_copy",
    "from_name",
    "capture",
    "transport",
    "graph_url",
    "gmail_url",
    "accounts",
    "alerts",
)
ACCOUNT_KEYS = (
    "address",
    "username",
    "password",
    "oauth",
    "smtp",
    "imap",
    "limits",
    "sent_copy",
    "from_name",
    "aliases",
    "transport",
    "graph_url",
    "gmail_url",
)

ADDRESS = "an address like user@example.com"
_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass(frozen=True)
class _Api:
    """``transport``, ``graph_url`` and ``gmail_url`` as written (None: not set here)."""

    transport: TransportKind | None = None
    transport_item: Item | None = None
    urls: dict[TransportKind, str] = field(default_factory=dict)

    def over(self, base: _Api) -> _Api:
        return _Api(
            transport=self.transport or base.transport,
            transport_item=self.transport_item if self.transport else base.transport_item,
            urls={**base.urls, **self.urls},
        )


def _read_api(rd: NodeReader, f: Fields) -> _Api:
    transport = rd.enum(f["transport"], TransportKind)
    urls: dict[TransportKind, str] = {}
    for kind, key in ((TransportKind.GRAPH, "graph_url"), (TransportKind.GMAIL_API, "gmail_url")):
        url = rd.parsed(f[key], parse_url, "an https URL", trim=True)
        if url is not None:
            urls[kind] = url.rstrip("/")
    return _Api(transport, f["transport"] if transport else None, urls)


@dataclass(frozen=True)
class _Tenant:
    """What a tenant passes on to its accounts."""

    name: str
    item: Item
    preset: Preset
    smtp: ServerLayer
    imap: ServerLayer
    oauth: OAuthLayer | None
    limits: LimitsLayer
    sent_copy: SentCopy | None
    from_name: str | None
    capture_path: Path | None
    web_configured: bool
    api: _Api = field(default_factory=_Api)


@dataclass(frozen=True)
class _Own:
    """An account's own settings (all empty for a tenant's domain template)."""

    username: str | None = None
    password: Item | None = None
    oauth: OAuthLayer | None = None
    smtp: ServerLayer = field(default_factory=ServerLayer)
    imap: ServerLayer = field(default_factory=ServerLayer)
    limits: LimitsLayer = field(default_factory=LimitsLayer)
    sent_copy: SentCopy | None = None
    from_name: str | None = None
    api: _Api = field(default_factory=_Api)


class _Claims:
    """Who claimed each sender address / domain first; a second claim is an error."""

    def __init__(self, rd: NodeReader, what: str, owner: str) -> None:
        self._rd = rd
        self._what = what
        self._owner = owner
        self._first: dict[str, str] = {}

    def claim(self, key: str, item: Item) -> None:
        first = self._first.setdefault(key, item.where)
        if first != item.where:
            self._rd.error(
                item.path,
                item.line,
                f"{self._what} {key} is also claimed by {first}; "
                f"a {self._what} may belong to only one {self._owner}",
            )


def _one_line(text: str) -> str:
    # from_name ends up in a From: header; a line break there would inject headers.
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError("control characters and line breaks are not allowed")
    return text


def read_tenants(
    rd: NodeReader, item: Item, state_directory: Path, *, web_configured: bool = False
) -> tuple[TenantConfig, ...]:
    """``web_configured``: a web listener exists, so ``password: {connect: true}`` can work."""
    senders = _Claims(rd, "sender", "account")
    domains = _Claims(rd, "domain", "tenant")
    tenants: list[TenantConfig] = []
    for name, tenant_item in rd.mapping(item, None).items():
        tenant = _read_tenant(
            rd, name, tenant_item, state_directory, senders, domains, web_configured
        )
        if tenant is not None:
            tenants.append(tenant)
    return tuple(tenants)


def _read_tenant(
    rd: NodeReader,
    name: str,
    item: Item,
    state_directory: Path,
    senders: _Claims,
    domain_claims: _Claims,
    web_configured: bool,
) -> TenantConfig | None:
    if not _TENANT_NAME.fullmatch(name):
        rd.error(item.path, item.line, "a tenant name is letters, digits, - and _")
    f = rd.record(item, TENANT_KEYS)
    if f is None:
        return None
    provider_item = f["provider"]
    choices = list(PRESETS)
    if not rd.require(provider_item, "one of " + ", ".join(choices)):
        return None
    provider = rd.choice(provider_item, choices)
    if provider is None:
        return None
    preset = PRESETS[provider]

    capture_path: Path | None = None
    if preset.is_capture:
        for key in ("smtp", "imap", "oauth", "transport"):
            if key in f:
                rd.error(f[key].path, f[key].line, _CAPTURE_HINT)
        capture = rd.mapping(f["capture"], ("path",))
        capture_path = rd.file_path(capture["path"], "a directory") or state_directory / "capture"
    elif "capture" in f:
        rd.error(f["capture"].path, f["capture"].line, "capture is only for provider capture")

    tenant = _Tenant(
        name=name,
        item=item,
        preset=preset,
        smtp=overlay(
            preset_server(preset.smtp, provider_item), read_server(rd, f["smtp"], SMTP_KEYS)
        ),
        imap=overlay(
            preset_server(preset.imap, provider_item), read_server(rd, f["imap"], IMAP_KEYS)
        ),
        oauth=read_oauth(rd, f["oauth"]) if f["oauth"].present else None,
        limits=read_limits(rd, f["limits"]),
        sent_copy=rd.enum(f["sent_copy"], SentCopy),
        from_name=rd.parsed(f["from_name"], _one_line, "a display name"),
        capture_path=capture_path,
        web_configured=web_configured,
        api=_read_api(rd, f),
    )

    patterns: list[AddressPattern] = []
    for domain_item in rd.sequence(f["domains"]):
        what = "a domain like example.com, *.example.com or *"
        pattern = rd.parsed(domain_item, parse_domain_pattern, what, trim=True)
        if pattern is not None:
            domain_claims.claim(pattern.text, domain_item)
            patterns.append(pattern)

    accounts: list[AccountConfig] = []
    account_items = rd.sequence(f["accounts"])
    for account_item in account_items:
        account = _read_account(rd, account_item, tenant, senders)
        if account is not None:
            accounts.append(account)

    domain_account = _domain_template(rd, f["domains"], tenant) if patterns else None
    if not account_items and not f["domains"].present:
        rd.warn(
            item.path, item.line, "the tenant has no accounts and no domains: nothing routes to it"
        )
    alerts = read_alerts(
        rd,
        f["alerts"],
        lambda address: any(a.owns(address) for a in accounts),
        whose=f"tenant {name}",
    )
    return TenantConfig(
        name=name,
        provider=provider,
        domains=tuple(patterns),
        accounts=tuple(accounts),
        domain_account=domain_account,
        where=item.where,
        alerts=alerts,
    )


_CAPTURE_HINT = (
    "provider capture delivers into a local Maildir and logs in nowhere; remove this key"
)


def _read_account(
    rd: NodeReader, item: Item, tenant: _Tenant, senders: _Claims
) -> AccountConfig | None:
    f = rd.record(item, ACCOUNT_KEYS)
    if f is None:
        return None
    rd.require(f["address"], ADDRESS)
    address = rd.parsed(f["address"], parse_address, ADDRESS, trim=True)
    if address is not None:
        senders.claim(address.lower(), f["address"])
    aliases: list[str] = []
    for alias_item in rd.sequence(f["aliases"]):
        alias = rd.parsed(alias_item, parse_address, ADDRESS, trim=True)
        if alias is not None:
            senders.claim(alias.lower(), alias_item)
            aliases.append(alias.lower())

    if tenant.preset.is_capture:
        for key in ("password", "oauth", "smtp", "imap", "transport"):
            if key in f:
                rd.error(f[key].path, f[key].line, _CAPTURE_HINT)
    own = _Own(
        username=rd.text(f["username"], "a user name", trim=True),
        password=f["password"] if f["password"].present else None,
        oauth=read_oauth(rd, f["oauth"]) if f["oauth"].present else None,
        smtp=read_server(rd, f["smtp"], SMTP_KEYS),
        imap=read_server(rd, f["imap"], IMAP_KEYS),
        limits=read_limits(rd, f["limits"]),
        sent_copy=rd.enum(f["sent_copy"], SentCopy),
        from_name=rd.parsed(f["from_name"], _one_line, "a display name"),
        api=_read_api(rd, f),
    )
    if address is None:
        return None
    return _assemble(rd, item, tenant, own, address.lower(), tuple(aliases))


def _domain_template(rd: NodeReader, item: Item, tenant: _Tenant) -> AccountConfig | None:
    """The account a sender routed by `domains:` gets: the tenant's settings, no address.

    Only app-only credentials can send as an address nobody configured one by one
    (SPEC "Routing", step 4); capture needs none.
    """
    flow = tenant.oauth.flow.value if tenant.oauth and tenant.oauth.flow else None
    if not tenant.preset.is_capture and flow not in APP_ONLY_FLOWS:
        rd.error(
            item.path,
            item.line,
            "routing by domain needs app-only credentials on the tenant: oauth flow "
            "client_credentials (Microsoft) or service_account (Google), or provider capture; "
            "otherwise list each sender under accounts",
        )
        return None
    return _assemble(rd, item, tenant, _Own(username=""), "", ())


def _assemble(
    rd: NodeReader, item: Item, tenant: _Tenant, own: _Own, address: str, aliases: tuple[str, ...]
) -> AccountConfig | None:
    preset = tenant.preset
    api = own.api.over(tenant.api)
    transport = api.transport or TransportKind.SMTP
    limits_layer = overlay(tenant.limits, own.limits)
    limits = build_limits(base_limits(transport, preset.limits), limits_layer)
    spot = limits_layer.max_connections
    if transport is TransportKind.GRAPH and spot and spot.value > GRAPH_MAX_CONCURRENT:
        rd.error(
            spot.path,
            spot.line,
            f"Microsoft Graph allows at most {GRAPH_MAX_CONCURRENT} concurrent requests per "
            f"mailbox; max_connections {spot.value} would only earn 429 replies",
        )
    sent_copy = own.sent_copy or tenant.sent_copy or SentCopy.AUTO
    from_name = own.from_name or tenant.from_name
    username = own.username if own.username is not None else address
    if preset.is_capture:
        return AccountConfig(
            address=address,
            tenant=tenant.name,
            provider=preset.name,
            username=username,
            password=None,
            oauth=None,
            smtp=None,
            imap=None,
            limits=limits,
            sent_copy=sent_copy,
            from_name=from_name,
            aliases=aliases,
            capture_path=tenant.capture_path,
            where=item.where,
        )

    password, connect = (
        _password(rd, own.password, tenant) if own.password is not None else (None, False)
    )
    oauth_layer: OAuthLayer | None = None
    if own.oauth is not None:
        if own.password is not None:
            rd.error(item.path, item.line, "an account logs in with password or oauth, not both")
        oauth_layer = overlay(tenant.oauth or OAuthLayer(), own.oauth)
    elif own.password is None:
        # No login of its own: the tenant's oauth (app-only, or a shared app registration
        # for delegated consent) covers it.
        oauth_layer = tenant.oauth
    if own.password is None and oauth_layer is None:
        rd.error(
            item.path,
            item.line,
            "the account needs a password (e.g. an app password) or oauth, "
            "on itself or through its tenant's oauth",
        )
    oauth = build_oauth(rd, oauth_layer, preset, item) if oauth_layer is not None else None
    if transport.is_http_api:
        oauth = _api_oauth(rd, item, preset.name, preset.oauth_family, api, password, oauth)

    # A missing server is reported once at the tenant unless the account tried to set one.
    smtp_owner = item if not own.smtp.is_empty else tenant.item
    imap_owner = item if not own.imap.is_empty else tenant.item
    smtp = build_smtp(rd, overlay(tenant.smtp, own.smtp), smtp_owner)
    imap = build_imap(rd, overlay(tenant.imap, own.imap), imap_owner)
    if sent_copy is SentCopy.ALWAYS and imap is None:
        rd.error(item.path, item.line, "sent_copy: always needs imap settings (imap.host)")
    return AccountConfig(
        address=address,
        tenant=tenant.name,
        provider=preset.name,
        username=username,
        password=password,
        connect_password=connect,
        oauth=oauth,
        smtp=smtp,
        imap=imap,
        limits=limits,
        sent_copy=sent_copy,
        from_name=from_name,
        aliases=aliases,
        capture_path=None,
        where=item.where,
        transport=transport,
        api_url=api.urls.get(transport, DEFAULT_URLS.get(transport)),
    )


# The OAuth family whose tokens each HTTP API accepts.
_API_FAMILY = {TransportKind.GRAPH: "microsoft", TransportKind.GMAIL_API: "google"}


def _api_oauth(
    rd: NodeReader,
    item: Item,
    provider: str,
    family: str,
    api: _Api,
    password: Secret | None,
    oauth: OAuthConfig | None,
) -> OAuthConfig | None:
    """An HTTP API account logs in with OAuth of the API's own identity platform, and asks
    for the API's scopes unless ``oauth.scopes`` says otherwise."""
    kind = api.transport
    assert kind is not None and api.transport_item is not None
    spot = api.transport_item
    label = TRANSPORT_LABELS[kind]
    if family != _API_FAMILY[kind]:
        wanted = (
            "microsoft365 or outlook"
            if kind is TransportKind.GRAPH
            else "gmail or google-workspace"
        )
        rd.error(
            spot.path,
            spot.line,
            f"transport {kind.value} ({label}) is for provider {wanted}, not {provider}",
        )
        return None
    if password is not None or oauth is None:
        rd.error(
            item.path,
            item.line,
            f"transport {kind.value} needs OAuth: {label} takes no passwords; set oauth "
            "(on the account or its tenant)",
        )
        return None
    if oauth.flow == "refresh_token":
        rd.error(
            spot.path,
            spot.line,
            f"transport {kind.value} needs oauth flow delegated or an app-only flow, "
            "not refresh_token",
        )
        return None
    if oauth.scopes:
        return oauth
    return dataclasses.replace(oauth, scopes=transport_scopes(kind, oauth.flow))


def _password(rd: NodeReader, item: Item, tenant: _Tenant) -> tuple[Secret | None, bool]:
    """A secret value, or ``{connect: true}``: the mailbox owner gives the app password on the
    web connect page (``relayd connect ADDRESS``). Returns (secret, connect)."""
    node = item.node
    if not isinstance(node, MappingNode) or not any(k.value == "connect" for k, _ in node.value):
        return read_secret(rd, item), False
    f = rd.mapping(item, ("connect",))
    value = rd.boolean(f["connect"])
    if value is not True:
        if value is False:
            rd.error(
                f["connect"].path,
                f["connect"].line,
                "connect: false means no password; write a secret value instead",
            )
        return None, False
    if not tenant.web_configured:
        rd.error(
            item.path,
            item.line,
            "password: {connect: true} needs the web listener, where the mailbox owner gives "
            "the password: add web: {address: ..., public_url: ...}",
        )
    return None, True
