"""Upstream settings that merge key by key: ``smtp``, ``imap``, ``oauth`` and ``limits``.

SPEC "Where keys go": a preset fills defaults, the tenant overrides them, the account overrides
the tenant, each key on its own. So these are read as partial *layers* first, every value
remembering where it was written; a layer stack is turned into a model record once per account,
and a problem found then still points at the line that caused it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from relayd.config.model import ImapServer, Limits, OAuthConfig, Secret, SmtpServer, TlsMode
from relayd.config.presets import OAUTH_FLOWS, Preset
from relayd.config.secrets import read_secret, read_service_account_key
from relayd.config.values import is_loopback_host, parse_host, parse_url
from relayd.config.yamlnodes import Item, NodeReader

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "IMAP_KEYS",
    "LIMITS_KEYS",
    "OAUTH_KEYS",
    "SMTP_KEYS",
    "LimitsLayer",
    "OAuthLayer",
    "ServerLayer",
    "Setting",
    "build_imap",
    "build_limits",
    "build_oauth",
    "build_smtp",
    "overlay",
    "preset_server",
    "read_limits",
    "read_oauth",
    "read_server",
]

T = TypeVar("T")
L = TypeVar("L", bound="DataclassInstance")

SMTP_KEYS = ("host", "port", "tls", "ca_file")
IMAP_KEYS = (*SMTP_KEYS, "username", "password", "sent_folder")
OAUTH_KEYS = (
    "flow",
    "client_id",
    "tenant_id",
    "client_secret",
    "certificate",
    "thumbprint",
    "service_account_key",
    "token_url",
    "revoke_url",
    "refresh_token",
    "scopes",
    "authority",
    "ca_file",
)
LIMITS_KEYS = ("max_connections", "max_messages_per_minute", "max_recipients")

# msal adds these scopes itself and raises ValueError when they are passed.
_MSAL_RESERVED_SCOPES = frozenset({"offline_access", "openid", "profile"})


@dataclass(frozen=True)
class Setting(Generic[T]):
    value: T
    path: str
    line: int
    from_preset: bool = False


def _at(item: Item, value: T | None) -> Setting[T] | None:
    return Setting(value, item.path, item.line) if value is not None else None


@dataclass(frozen=True)
class ServerLayer:
    host: Setting[str] | None = None
    port: Setting[int] | None = None
    tls: Setting[TlsMode] | None = None
    ca_file: Setting[Path] | None = None
    username: Setting[str] | None = None
    password: Setting[Secret] | None = None
    sent_folder: Setting[str] | None = None
    # True when a key was written but could not be read: that problem is reported already, so
    # "missing" is not reported on top of it.
    broken: bool | None = None

    @property
    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self) if f.name != "broken")


@dataclass(frozen=True)
class OAuthLayer:
    flow: Setting[str] | None = None
    client_id: Setting[str] | None = None
    tenant_id: Setting[str] | None = None
    client_secret: Setting[Secret] | None = None
    certificate: Setting[Secret] | None = None
    thumbprint: Setting[str] | None = None
    service_account_key: Setting[Secret] | None = None
    token_url: Setting[str] | None = None
    revoke_url: Setting[str] | None = None
    refresh_token: Setting[Secret] | None = None
    scopes: Setting[tuple[str, ...]] | None = None
    authority: Setting[str] | None = None
    ca_file: Setting[Path] | None = None
    broken: bool | None = None  # as ServerLayer.broken


@dataclass(frozen=True)
class LimitsLayer:
    max_connections: Setting[int] | None = None
    max_messages_per_minute: Setting[int] | None = None
    max_recipients: Setting[int] | None = None


def overlay(base: L, top: L) -> L:
    """``base`` with every key that ``top`` sets replaced by ``top``'s."""
    changes = {f.name: getattr(top, f.name) for f in fields(top)}
    return replace(base, **{name: value for name, value in changes.items() if value is not None})


# -- reading layers ---------------------------------------------------------------------------


def _broken(rd: NodeReader, problems_before: int) -> bool | None:
    return True if len(rd.problems) > problems_before else None


def read_server(rd: NodeReader, item: Item, keys: tuple[str, ...]) -> ServerLayer:
    before = len(rd.problems)
    f = rd.mapping(item, keys)
    layer = ServerLayer(
        host=_at(
            f["host"], rd.parsed(f["host"], parse_host, "a host name or IP address", trim=True)
        ),
        port=_at(f["port"], rd.integer(f["port"], 1, 65535)),
        tls=_at(f["tls"], rd.enum(f["tls"], TlsMode)),
        ca_file=_at(f["ca_file"], rd.file_path(f["ca_file"])),
        username=_at(f["username"], rd.text(f["username"], "a user name", trim=True)),
        password=_at(f["password"], read_secret(rd, f["password"])),
        sent_folder=_at(f["sent_folder"], rd.text(f["sent_folder"], "a folder name")),
    )
    return replace(layer, broken=_broken(rd, before))


def preset_server(server: SmtpServer | ImapServer | None, item: Item) -> ServerLayer:
    """A preset's server as the bottom layer; its values point at the `provider:` line."""
    if server is None:
        return ServerLayer()

    def at(value: T) -> Setting[T]:
        return Setting(value, item.path, item.line, from_preset=True)

    return ServerLayer(host=at(server.host), port=at(server.port), tls=at(server.tls))


def read_oauth(rd: NodeReader, item: Item) -> OAuthLayer:
    before = len(rd.problems)
    f = rd.mapping(item, OAUTH_KEYS)
    scopes = [rd.text(i, "a scope") for i in rd.sequence(f["scopes"])]
    layer = OAuthLayer(
        flow=_at(f["flow"], rd.choice(f["flow"], OAUTH_FLOWS)),
        client_id=_at(f["client_id"], rd.text(f["client_id"], "a client id", trim=True)),
        tenant_id=_at(f["tenant_id"], rd.text(f["tenant_id"], "a tenant id", trim=True)),
        client_secret=_at(f["client_secret"], read_secret(rd, f["client_secret"])),
        certificate=_at(f["certificate"], read_secret(rd, f["certificate"])),
        thumbprint=_at(f["thumbprint"], rd.text(f["thumbprint"], "a thumbprint", trim=True)),
        service_account_key=_at(
            f["service_account_key"], read_service_account_key(rd, f["service_account_key"])
        ),
        token_url=_at(f["token_url"], rd.parsed(f["token_url"], parse_url, "an https URL")),
        revoke_url=_at(f["revoke_url"], rd.parsed(f["revoke_url"], parse_url, "an https URL")),
        refresh_token=_at(f["refresh_token"], read_secret(rd, f["refresh_token"])),
        scopes=_at(f["scopes"], tuple(s for s in scopes if s is not None)),
        authority=_at(f["authority"], rd.parsed(f["authority"], parse_url, "an https URL")),
        ca_file=_at(f["ca_file"], rd.file_path(f["ca_file"])),
    )
    return replace(layer, broken=_broken(rd, before))


def read_limits(rd: NodeReader, item: Item) -> LimitsLayer:
    f = rd.mapping(item, LIMITS_KEYS)
    return LimitsLayer(
        max_connections=_at(f["max_connections"], rd.integer(f["max_connections"], 1)),
        max_messages_per_minute=_at(
            f["max_messages_per_minute"], rd.integer(f["max_messages_per_minute"], 0)
        ),
        max_recipients=_at(f["max_recipients"], rd.integer(f["max_recipients"], 0)),
    )


# -- building model records -------------------------------------------------------------------


@dataclass(frozen=True)
class _Protocol:
    name: str
    implicit_port: int
    starttls_port: int
    plain_port: int


_SMTP = _Protocol("smtp", implicit_port=465, starttls_port=587, plain_port=25)
_IMAP = _Protocol("imap", implicit_port=993, starttls_port=143, plain_port=143)


def _port_and_tls(rd: NodeReader, layer: ServerLayer, proto: _Protocol) -> tuple[int, TlsMode]:
    port, tls = layer.port, layer.tls
    if port is None and tls is None:
        default = TlsMode.IMPLICIT if proto is _IMAP else TlsMode.STARTTLS
        return (proto.implicit_port if proto is _IMAP else proto.starttls_port), default
    if port is None:
        assert tls is not None
        ports = {
            TlsMode.IMPLICIT: proto.implicit_port,
            TlsMode.STARTTLS: proto.starttls_port,
            TlsMode.NONE: proto.plain_port,
        }
        return ports[tls.value], tls.value
    if tls is None:
        return (
            port.value,
            TlsMode.IMPLICIT if port.value == proto.implicit_port else TlsMode.STARTTLS,
        )
    # Users mix up 465/587: likely a mistake, but it may be deliberate.
    swapped = (port.value == proto.implicit_port and tls.value is TlsMode.STARTTLS) or (
        port.value == proto.starttls_port and tls.value is TlsMode.IMPLICIT
    )
    if swapped:
        spot = tls if port.from_preset else port
        rd.warn(
            spot.path,
            spot.line,
            f"{proto.name} port {port.value} with tls: {tls.value.value}; port "
            f"{proto.implicit_port} normally means implicit and {proto.starttls_port} starttls",
        )
    return port.value, tls.value


def _check_plaintext(
    rd: NodeReader, layer: ServerLayer, tls: TlsMode, host: str, name: str
) -> bool:
    if tls is TlsMode.NONE and not is_loopback_host(host):
        spot = layer.tls
        assert spot is not None  # TLS none is never a default
        rd.error(
            spot.path,
            spot.line,
            f"tls: none is allowed only for an upstream on a loopback address (127.0.0.0/8, ::1, "
            f"localhost), not {name} host {host}: passwords and mail would cross the network in "
            "clear text",
        )
        return False
    return True


def build_smtp(rd: NodeReader, layer: ServerLayer, owner: Item) -> SmtpServer | None:
    if layer.host is None:
        if layer.broken:
            return None
        rd.error(
            owner.path,
            owner.line,
            "smtp.host is missing: provider custom has no default server; set "
            "smtp: {host: ..., port: ..., tls: ...} on the tenant or the account",
        )
        return None
    port, tls = _port_and_tls(rd, layer, _SMTP)
    if not _check_plaintext(rd, layer, tls, layer.host.value, "smtp"):
        return None
    ca_file = layer.ca_file.value if layer.ca_file else None
    return SmtpServer(layer.host.value, port, tls, ca_file)


def build_imap(rd: NodeReader, layer: ServerLayer, owner: Item) -> ImapServer | None:
    """None when no IMAP host is known (custom without imap: no Sent copy)."""
    if layer.host is None:
        if not layer.is_empty and not layer.broken:
            rd.error(owner.path, owner.line, "imap.host is missing (the other imap keys need it)")
        return None
    port, tls = _port_and_tls(rd, layer, _IMAP)
    if not _check_plaintext(rd, layer, tls, layer.host.value, "imap"):
        return None
    return ImapServer(
        host=layer.host.value,
        port=port,
        tls=tls,
        ca_file=layer.ca_file.value if layer.ca_file else None,
        username=layer.username.value if layer.username else None,
        password=layer.password.value if layer.password else None,
        sent_folder=layer.sent_folder.value if layer.sent_folder else None,
    )


def build_limits(base: Limits, layer: LimitsLayer) -> Limits:
    changes = {f.name: getattr(layer, f.name) for f in fields(layer)}
    return replace(base, **{k: v.value for k, v in changes.items() if v is not None})


def _missing_credentials(layer: OAuthLayer, flow: str, family: str) -> list[str]:
    missing: list[str] = []
    if flow in ("delegated", "client_credentials", "refresh_token") and layer.client_id is None:
        missing.append("client_id")
    microsoft_app = family == "microsoft" and flow != "refresh_token"
    if microsoft_app and layer.tenant_id is None and layer.authority is None:
        missing.append("tenant_id (or authority)")
    if flow == "client_credentials" and layer.client_secret is None and layer.certificate is None:
        missing.append("client_secret or certificate")
    if family == "google" and flow == "delegated" and layer.client_secret is None:
        missing.append("client_secret (of the Google installed-app client)")
    if layer.certificate is not None and layer.thumbprint is None:
        missing.append("thumbprint (of the certificate)")
    if flow == "service_account" and layer.service_account_key is None:
        missing.append("service_account_key")
    if flow == "refresh_token" and layer.token_url is None:
        missing.append("token_url")
    return missing


def build_oauth(
    rd: NodeReader, layer: OAuthLayer, preset: Preset, owner: Item
) -> OAuthConfig | None:
    flow = layer.flow
    if flow is None:
        if layer.broken:
            return None
        rd.error(
            owner.path,
            owner.line,
            "oauth.flow is missing; expected one of " + ", ".join(OAUTH_FLOWS),
        )
        return None
    if flow.value not in preset.oauth_flows:
        usable = ", ".join(f for f in OAUTH_FLOWS if f in preset.oauth_flows)
        rd.error(
            flow.path,
            flow.line,
            f"provider {preset.name} does not support oauth flow {flow.value}; "
            + (f"use one of {usable}" if usable else "it logs in with a password"),
        )
        return None
    ok = True
    missing = [] if layer.broken else _missing_credentials(layer, flow.value, preset.oauth_family)
    if missing:
        rd.error(
            owner.path,
            owner.line,
            f"oauth flow {flow.value} needs {', '.join(missing)} "
            "(in the tenant's or the account's oauth)",
        )
        ok = False
    if flow.value == "client_credentials" and layer.client_secret and layer.certificate:
        rd.error(owner.path, owner.line, "oauth takes client_secret or certificate, not both")
        ok = False
    scopes = layer.scopes
    if preset.oauth_family == "microsoft" and scopes is not None:
        reserved = sorted(_MSAL_RESERVED_SCOPES.intersection(scopes.value))
        if reserved:
            rd.error(
                scopes.path,
                scopes.line,
                f"remove {', '.join(reserved)}: msal adds it itself and refuses it when passed",
            )
            ok = False
    if not ok:
        return None

    def value(setting: Setting[T] | None) -> T | None:
        return setting.value if setting is not None else None

    return OAuthConfig(
        flow=flow.value,
        client_id=value(layer.client_id),
        tenant_id=value(layer.tenant_id),
        client_secret=value(layer.client_secret),
        certificate=value(layer.certificate),
        thumbprint=value(layer.thumbprint),
        service_account_key=value(layer.service_account_key),
        token_url=value(layer.token_url),
        revoke_url=value(layer.revoke_url),
        refresh_token=value(layer.refresh_token),
        scopes=scopes.value if scopes is not None else (),
        authority=value(layer.authority),
        ca_file=value(layer.ca_file),
    )
