"""The configuration file → :class:`~relayd.config.model.Config` (SPEC "Configuration").

The file is read in one pass that collects every problem (``clients`` and ``listen`` in
``clients``, ``tenants`` in ``tenants``, the rest here). Any problem → ConfigError listing them
all, in file order; warnings travel in ``Config.warnings`` for ``check-config`` and the log.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import replace
from pathlib import Path

from yaml.nodes import MappingNode

from relayd.config.alerts import read_alerts
from relayd.config.clients import PATTERN, read_clients, read_listeners
from relayd.config.fleet import read_fleet
from relayd.config.model import (
    DEFAULT_STOP_TIMEOUT,
    AddressPattern,
    AlertsConfig,
    ClientConnections,
    Config,
    MetricsConfig,
    RetryPolicy,
    SpoolConfig,
    TenantConfig,
)
from relayd.config.secrets import read_secret
from relayd.config.tenants import read_tenants
from relayd.config.values import (
    helo_name_problem,
    parse_address,
    parse_host,
    parse_host_port,
    parse_pattern,
)
from relayd.config.web import read_web
from relayd.config.yamlnodes import ConfigError, Item, NodeReader, compose, line_of

__all__ = ["DEFAULT_CONFIG_PATH", "DEFAULT_STATE_DIRECTORY", "find_config_path", "load_config"]

_LINE = re.compile(r": line ([0-9]+): ")

DEFAULT_CONFIG_PATH = Path("/etc/relayd/relayd.yaml")
DEFAULT_STATE_DIRECTORY = Path("/var/lib/relayd")

ROOT_KEYS = (
    "state_directory",
    "helo_name",
    "log_level",
    "listen",
    "accept_processes",
    "clients",
    "rewrite_senders",
    "spool",
    "tokens",
    "tenants",
    "alerts",
    "metrics",
    "client_connections",
    "stop_timeout",
    "web",
    "fleet",
)
CLIENT_CONNECTIONS_KEYS = (
    "max",
    "idle_timeout",
    "silent_timeout",
    "min_data_rate",
    "junk_commands",
)
SPOOL_KEYS = ("max_message_size", "retry", "delay_warning", "encrypt_at_rest", "key")
MIN_SPOOL_KEY_BYTES = 32
RETRY_KEYS = ("first", "max", "give_up_after")
LOG_LEVELS = ("debug", "info", "warning", "error")

ADDRESS = "an address like user@example.com"

_HINT = (
    "pass -c FILE, set RELAYD_CONFIG, or create /etc/relayd/relayd.yaml "
    "(etc/relayd.example.yaml documents every option; etc/relayd.local.yaml is a demo "
    "that keeps all mail in a local Maildir)"
)


def find_config_path(cli_path: str | None) -> Path:
    """SPEC "Files and directories": ``-c FILE``, else ``$RELAYD_CONFIG``, else
    /etc/relayd/relayd.yaml. relayd never starts on a built-in default."""
    for origin, candidate in (("-c", cli_path), ("RELAYD_CONFIG", os.environ.get("RELAYD_CONFIG"))):
        if candidate:
            path = Path(candidate).absolute()
            if not path.is_file():
                raise ConfigError([f"{path} (from {origin}): no such file"])
            return path
    if DEFAULT_CONFIG_PATH.is_file():
        return DEFAULT_CONFIG_PATH
    raise ConfigError([f"no configuration file found: {_HINT}"])


def load_config(path: Path) -> Config:
    path = path.absolute()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    root = compose(text, str(path))
    if root is None:
        raise ConfigError([f"{path}: the file is empty; see etc/relayd.example.yaml"])
    if not isinstance(root, MappingNode):
        raise ConfigError([f"{path}: line {line_of(root)}: expected a mapping of settings"])
    rd = NodeReader(base_dir=path.parent)
    config = _read(rd, Item("", root, 1), path)
    if rd.problems:
        raise ConfigError(_in_file_order(rd.problems), _in_file_order(rd.warnings))
    return replace(config, warnings=tuple(_in_file_order(rd.warnings)))


def _in_file_order(messages: list[str]) -> list[str]:
    """Sorted by line (stable), once each: a tenant's problem can surface once per account."""

    def line(message: str) -> int:
        found = _LINE.search(message)
        return int(found.group(1)) if found else 0

    return sorted(dict.fromkeys(messages), key=line)


def _default_state_directory() -> Path:
    # systemd's StateDirectory= sets $STATE_DIRECTORY, colon-separated when it names several.
    from_systemd = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(from_systemd) if from_systemd else DEFAULT_STATE_DIRECTORY


def _read(rd: NodeReader, root: Item, path: Path) -> Config:
    f = rd.mapping(root, ROOT_KEYS)
    state = rd.file_path(f["state_directory"], "a directory") or _default_state_directory()
    helo = rd.parsed(f["helo_name"], parse_host, "a host name", trim=True) or socket.getfqdn()
    clients = read_clients(rd, f["clients"])
    listeners = read_listeners(rd, f["listen"], clients)
    web = read_web(rd, f["web"])
    tenants = read_tenants(rd, f["tenants"], state, web_configured=web is not None)
    _check_helo_name(rd, f["helo_name"], helo, tenants)
    tokens = rd.mapping(f["tokens"], ("key",))
    return Config(
        source=path,
        state_directory=state,
        helo_name=helo,
        log_level=rd.choice(f["log_level"], LOG_LEVELS) or "info",
        listeners=listeners,
        accept_processes=_accept_processes(rd, f["accept_processes"]),
        clients=clients,
        rewrite_senders=_rewrite_senders(rd, f["rewrite_senders"]),
        spool=_spool(rd, f["spool"]),
        tokens_key=read_secret(rd, tokens["key"]),
        tenants=tenants,
        alerts=_alerts(rd, f["alerts"], tenants),
        metrics=_metrics(rd, f["metrics"]),
        client_connections=_client_connections(rd, f["client_connections"]),
        stop_timeout=rd.duration(f["stop_timeout"]) or DEFAULT_STOP_TIMEOUT,
        web=web,
        fleet=read_fleet(rd, f["fleet"], tokens["key"]),
    )


# -- the rest of the top level ----------------------------------------------------------------


def _client_connections(rd: NodeReader, item: Item) -> ClientConnections:
    f = rd.mapping(item, CLIENT_CONNECTIONS_KEYS)
    default = ClientConnections()
    return ClientConnections(
        max=rd.integer(f["max"], 1) or default.max,
        idle_timeout=rd.duration(f["idle_timeout"]) or default.idle_timeout,
        silent_timeout=rd.duration(f["silent_timeout"]) or default.silent_timeout,
        min_data_rate=rd.integer(f["min_data_rate"], 1) or default.min_data_rate,
        junk_commands=rd.integer(f["junk_commands"], 1) or default.junk_commands,
    )


MAX_ACCEPT_PROCESSES = 64


def _accept_processes(rd: NodeReader, item: Item) -> int | None:
    """``auto`` (the default: one per CPU, plus one), or how many processes accept SMTP
    connections beside the main one; 0 lets the main process accept them itself."""
    if not item.present:
        return None
    what = f"auto or an integer 0-{MAX_ACCEPT_PROCESSES}"
    value = rd.text(item, what)
    if value is None or value == "auto":
        return None
    if value.isascii() and value.isdigit() and int(value) <= MAX_ACCEPT_PROCESSES:
        return int(value)
    rd.expected(item, what)
    return None


def _rewrite_senders(rd: NodeReader, item: Item) -> tuple[tuple[AddressPattern, str], ...]:
    """SPEC: a key is a bare local part or an address pattern.

    A bare local part (``root``) stays an AddressPattern without "@": routing matches it
    against ``root``, ``root@localhost`` and ``root@<this host>``, as cron writes them.
    """
    rules: list[tuple[AddressPattern, str]] = []
    for key, value_item in rd.mapping(item, None).items():
        target = rd.parsed(value_item, parse_address, ADDRESS, trim=True)
        sender = key.strip()
        if sender != key:
            rd.warn(
                value_item.path, value_item.line, "leading/trailing whitespace removed from the key"
            )
        try:
            if "@" in sender or sender == "*":
                pattern = parse_pattern(sender)
            else:
                pattern = AddressPattern(parse_address(f"{sender}@localhost").split("@")[0].lower())
        except ValueError as exc:
            rd.error(
                value_item.path,
                value_item.line,
                f"the key must be a local part (e.g. root) or {PATTERN}: {exc}",
            )
            continue
        if target is not None:
            rules.append((pattern, target))
    return tuple(rules)


def _spool(rd: NodeReader, item: Item) -> SpoolConfig:
    f = rd.mapping(item, SPOOL_KEYS)
    retry = rd.mapping(f["retry"], RETRY_KEYS)
    first = rd.duration(retry["first"]) or 300.0
    longest = rd.duration(retry["max"]) or 3600.0
    give_up = rd.duration(retry["give_up_after"]) or 5 * 86400.0
    if first > longest:
        rd.error(retry.path, retry.line, "retry.first is longer than retry.max")
    encrypt = rd.boolean(f["encrypt_at_rest"]) or False
    key = read_secret(rd, f["key"])
    if encrypt and not f["key"].present:
        rd.error(
            f["encrypt_at_rest"].path,
            f["encrypt_at_rest"].line,
            "encrypt_at_rest: true needs spool.key "
            "(a secret value, e.g. {credential: relayd-spool-key})",
        )
    elif key is not None and len(key.reveal().encode()) < MIN_SPOOL_KEY_BYTES:
        # HKDF derives keys; it does not stretch a guessable passphrase.
        rd.error(
            f["key"].path,
            f["key"].line,
            f"too short for a key: give at least {MIN_SPOOL_KEY_BYTES} random characters, "
            "e.g. the output of `openssl rand -base64 32`",
        )
    delay_warning = rd.duration(f["delay_warning"], allow_zero=True)
    size = rd.size(f["max_message_size"])
    if size == 0:
        rd.expected(f["max_message_size"], "a size of more than 0 bytes")
    return SpoolConfig(
        max_message_size=size or 35 * 2**20,
        retry=RetryPolicy(first=first, max=longest, give_up_after=give_up),
        delay_warning=delay_warning or 0.0,
        encrypt_at_rest=encrypt,
        key=key,
    )


def _owned(tenants: tuple[TenantConfig, ...], address: str) -> bool:
    for tenant in tenants:
        if any(a.owns(address) for a in tenant.accounts):
            return True
        if tenant.domain_account and any(p.matches(address) for p in tenant.domains):
            return True
    return False


def _check_helo_name(
    rd: NodeReader, item: Item, helo: str, tenants: tuple[TenantConfig, ...]
) -> None:
    """Warn about an EHLO name providers may refuse, unless no mail leaves the host (every
    tenant captures, as the demo does)."""
    if all(t.provider == "capture" for t in tenants):
        return
    problem = helo_name_problem(helo)
    if problem is None:
        return
    fix = "set helo_name to this host's public name (a name that resolves to it)"
    if item.present:
        rd.warn(item.path, item.line, f"{helo!r} is {problem}; {fix}")
    else:
        rd.warnings.append(
            f"helo_name: not set, and this host's name {helo!r} is {problem}: providers may "
            f"refuse it in EHLO; {fix}"
        )


def _alerts(rd: NodeReader, item: Item, tenants: tuple[TenantConfig, ...]) -> AlertsConfig | None:
    return read_alerts(rd, item, lambda address: _owned(tenants, address), whose="any tenant")


def _metrics(rd: NodeReader, item: Item) -> MetricsConfig | None:
    if not item.present:
        return None
    f = rd.mapping(item, ("address",))
    what = "an address like 127.0.0.1:9425"
    rd.require(f["address"], what)
    found = rd.parsed(f["address"], parse_host_port, what, trim=True)
    return MetricsConfig(address=found[0], port=found[1]) if found else None
