"""The config loader: every problem with its YAML path and exact line, defaults, presets,
merging, secrets, and the security rules of SPEC "Configuration"."""

from __future__ import annotations

import io
import socket
import textwrap
from pathlib import Path

import pytest

from relayd import cli
from relayd.config import (
    ANONYMOUS,
    AddressPattern,
    AuthPolicy,
    Config,
    ConfigError,
    SentCopy,
    TlsMode,
    find_config_path,
    load_config,
)
from relayd.config.presets import PRESETS
from relayd.config.yamlnodes import parse_duration, parse_size
from relayd.passwords import hash_password

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "etc" / "relayd.example.yaml"
LOCAL = REPO / "etc" / "relayd.local.yaml"
SECRET = "s3cret-Value-never-shown"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STATE_DIRECTORY", "CREDENTIALS_DIRECTORY", "RELAYD_CONFIG", "INFO_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    # The default helo_name is the host's name: a proper one here, whatever this machine's is
    # (the tests of the warning about a poor one set their own).
    monkeypatch.setattr(socket, "getfqdn", lambda name="": "app01.acme.example")
    monkeypatch.setenv("PW", SECRET)


def write(tmp_path: Path, text: str, name: str = "relayd.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    for line in [*info.value.problems, *info.value.warnings]:
        assert SECRET not in line
    return info.value.problems


# -- defaults ---------------------------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, "log_level: info\n")
    assert config.source == tmp_path / "relayd.yaml"
    assert config.state_directory == Path("/var/lib/relayd")
    assert config.helo_name == socket.getfqdn()
    assert config.log_level == "info"
    (listener,) = config.listeners
    assert (listener.tcp_host, listener.tcp_port) == ("127.0.0.1", 2525)
    assert (listener.auth, listener.tls) == (AuthPolicy.OPTIONAL, TlsMode.NONE)
    assert list(config.clients) == [ANONYMOUS]
    assert config.clients[ANONYMOUS].may_send_as == ()
    assert config.spool.max_message_size == 35 * 2**20
    retry = config.spool.retry
    assert (retry.first, retry.max, retry.give_up_after) == (300, 3600, 5 * 86400)
    assert config.spool.delay_warning == 0
    assert config.spool.encrypt_at_rest is False
    assert config.tokens_key is None
    assert (config.alerts, config.metrics, config.tenants, config.warnings) == (None, None, (), ())


def test_state_directory_from_systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/relayd:/var/lib/other")
    assert load(tmp_path, "log_level: info\n").state_directory == Path("/var/lib/relayd")
    monkeypatch.setenv("STATE_DIRECTORY", "/srv/state")
    assert load(tmp_path, "log_level: info\n").state_directory == Path("/srv/state")


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        state_directory: state
        listen:
          - address: unix:run/smtp.sock
        """,
    )
    assert config.state_directory == tmp_path / "state"
    assert config.listeners[0].unix_path == tmp_path / "run/smtp.sock"


def test_empty_file_and_not_a_mapping(tmp_path: Path) -> None:
    assert "the file is empty" in problems(tmp_path, "# nothing\n")[0]
    assert problems(tmp_path, "- a\n") == [
        f"{tmp_path}/relayd.yaml: line 1: expected a mapping of settings"
    ]


def test_yaml_syntax_error_has_its_line(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path, "log_level: info\nlisten:\n  - address: [\n")
    assert problem.startswith(f"{tmp_path}/relayd.yaml: line 4:")


# -- errors: path and line --------------------------------------------------------------------


def test_spec_example_message(tmp_path: Path) -> None:
    assert problems(
        tmp_path,
        """
        tenants:
          acme:
            provider: custom
            smtp:
              host: mail.acme.example
              port: "5870 "
        """,
    ) == ['tenants.acme.smtp.port: line 6: expected an integer 1-65535, got "5870 "']


ACCOUNT = """
tenants:
  t:
    provider: gmail
    accounts:
      - address: a@example.com
        password: {env: PW}
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "lsten: []\n",
            "lsten: line 1: unknown key; allowed keys: state_directory, helo_name, log_level, "
            "listen, accept_processes, clients, rewrite_senders, spool, tokens, tenants, "
            "alerts, metrics, client_connections, stop_timeout, web, fleet",
        ),
        (
            "listen:\n  - address: 127.0.0.1:2525\n    tsl: none\n",
            "listen[0].tsl: line 3: unknown key; allowed keys: address, auth, tls, certificate, "
            "private_key, tls_min_version",
        ),
        (
            "clients:\n  crm:\n    networks: [10.0.0.0/8]\n    password: x\n",
            "clients.crm.password: line 4: unknown key; allowed keys: password_hash, unix_users, "
            "networks, may_send_as",
        ),
        (
            "spool:\n  retry: {first: 5m, maximum: 1h}\n",
            "spool.retry.maximum: line 2: unknown key; allowed keys: first, max, give_up_after",
        ),
        ("tokens: {secret: x}\n", "tokens.secret: line 1: unknown key; allowed keys: key"),
        (
            "alerts:\n  via: a@example.com\n  mail: b@example.com\n",
            "alerts.mail: line 3: unknown key; allowed keys: via, email, webhook",
        ),
        (
            "metrics: {address: 127.0.0.1:9425, port: 1}\n",
            "metrics.port: line 1: unknown key; allowed keys: address",
        ),
        (
            ACCOUNT + "    domain: [example.com]\n",
            "tenants.t.domain: line 7: unknown key; allowed keys: provider, domains, smtp, imap, "
            "oauth, limits, sent_copy, from_name, capture, transport, graph_url, gmail_url, "
            "accounts, alerts",
        ),
        (
            ACCOUNT + "        passwd: x\n",
            "tenants.t.accounts[0].passwd: line 7: unknown key; allowed keys: address, username, "
            "password, oauth, smtp, imap, limits, sent_copy, from_name, aliases, transport, "
            "graph_url, gmail_url",
        ),
        (
            ACCOUNT + "        smtp: {hostname: x}\n",
            "tenants.t.accounts[0].smtp.hostname: line 7: unknown key; allowed keys: host, port, "
            "tls, ca_file",
        ),
        (
            ACCOUNT + "        imap: {folder: x}\n",
            "tenants.t.accounts[0].imap.folder: line 7: unknown key; allowed keys: host, port, "
            "tls, ca_file, username, password, sent_folder",
        ),
        (
            ACCOUNT + "        limits: {max_conns: 1}\n",
            "tenants.t.accounts[0].limits.max_conns: line 7: unknown key; allowed keys: "
            "max_connections, max_messages_per_minute, max_recipients",
        ),
        (
            ACCOUNT + "    oauth: {flow: delegated, secret: x}\n",
            "tenants.t.oauth.secret: line 7: unknown key; allowed keys: flow, client_id, "
            "tenant_id, client_secret, certificate, thumbprint, service_account_key, token_url, "
            "revoke_url, refresh_token, scopes, authority, ca_file",
        ),
        (
            ACCOUNT + "  s:\n    provider: capture\n    capture: {dir: x}\n",
            "tenants.s.capture.dir: line 9: unknown key; allowed keys: path",
        ),
        (
            ACCOUNT.replace("{env: PW}", "{path: /x}"),
            "tenants.t.accounts[0].password.path: line 6: unknown key; allowed keys: env, file, "
            "credential",
        ),
        (
            "log_level: info\nlog_level: debug\n",
            "log_level: line 2: duplicate key (first written on line 1)",
        ),
    ],
)
def test_unknown_and_duplicate_keys(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in problems(tmp_path, text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "log_level: verbose\n",
            'log_level: line 1: expected one of debug, info, warning, error, got "verbose"',
        ),
        (
            "listen: 127.0.0.1:2525\n",
            'listen: line 1: expected a list, got "127.0.0.1:2525": write [127.0.0.1:2525]',
        ),
        ("clients: [crm]\n", "clients: line 1: expected a mapping, got a list"),
        (
            "listen:\n  - address: 127.0.0.1:2525\n    auth: yes\n",
            'listen[0].auth: line 3: expected one of none, optional, required, got "yes"',
        ),
        (
            "listen:\n  - address: 127.0.0.1:2525\n    tls: ssl\n",
            'listen[0].tls: line 3: expected one of none, starttls, implicit, got "ssl"',
        ),
        (
            "listen:\n  - address: 127.0.0.1:2525\n    tls_min_version: 1.1\n",
            'listen[0].tls_min_version: line 3: expected one of 1.2, 1.3, got "1.1"',
        ),
        (
            "listen:\n  - auth: none\n",
            "listen[0].address: line 2: missing; expected a listen address like 127.0.0.1:2525, "
            "[::1]:2525 or unix:/run/relayd/smtp.sock",
        ),
        (
            "spool: {encrypt_at_rest: maybe}\n",
            'spool.encrypt_at_rest: line 1: expected true or false, got "maybe"',
        ),
        (
            "spool:\n  max_message_size: 35 megs\n",
            "spool.max_message_size: line 2: expected a size like 35MiB, 10MB or a number of "
            'bytes, got "35 megs"',
        ),
        (
            "spool:\n  max_message_size: 0\n",
            'spool.max_message_size: line 2: expected a size of more than 0 bytes, got "0"',
        ),
        (
            "spool:\n  retry:\n    first: 0\n",
            'spool.retry.first: line 3: expected a duration like 30s, 5m, 1h or 5d, got "0": '
            "must be more than 0",
        ),
        (
            "spool:\n  retry: {first: 2h, max: 1h}\n",
            "spool.retry: line 2: retry.first is longer than retry.max",
        ),
        (
            "spool:\n  delay_warning: 4 hours\n",
            "spool.delay_warning: line 2: expected a duration like 30s, 5m, 1h or 5d (0 = off), "
            'got "4 hours"',
        ),
        (
            ACCOUNT + "        limits: {max_connections: 0}\n",
            "tenants.t.accounts[0].limits.max_connections: line 7: expected an integer of 1 or "
            'more, got "0"',
        ),
        (
            ACCOUNT + "        limits: {max_recipients: -1}\n",
            "tenants.t.accounts[0].limits.max_recipients: line 7: expected an integer of 0 or "
            'more, got "-1"',
        ),
        (
            ACCOUNT + "        sent_copy: sometimes\n",
            "tenants.t.accounts[0].sent_copy: line 7: expected one of auto, always, never, got "
            '"sometimes"',
        ),
        (
            ACCOUNT + "        smtp: {port: 0}\n",
            'tenants.t.accounts[0].smtp.port: line 7: expected an integer 1-65535, got "0"',
        ),
        (
            ACCOUNT + "        smtp: {port: 65536}\n",
            'tenants.t.accounts[0].smtp.port: line 7: expected an integer 1-65535, got "65536"',
        ),
        (
            ACCOUNT + "        smtp: {port: 0x1d1}\n",
            'tenants.t.accounts[0].smtp.port: line 7: expected an integer 1-65535, got "0x1d1"',
        ),
        (
            ACCOUNT + "        smtp: {host: 'mail host'}\n",
            "tenants.t.accounts[0].smtp.host: line 7: expected a host name or IP address, got "
            '"mail host": not a host name or IP address',
        ),
        (
            ACCOUNT + '        from_name: "A\\nBcc: x@example.com"\n',
            'tenants.t.accounts[0].from_name: line 7: expected a display name, got "A\\nBcc: '
            'x@example.com": control characters and line breaks are not allowed',
        ),
        (
            "tenants:\n  t:\n    provider: hotmail\n",
            "tenants.t.provider: line 3: expected one of gmail, google-workspace, microsoft365, "
            'outlook, icloud, yahoo, fastmail, zoho, custom, capture, got "hotmail"',
        ),
        (
            "tenants:\n  t:\n    domains: [example.com]\n",
            "tenants.t.provider: line 2: missing; expected one of gmail, google-workspace, "
            "microsoft365, outlook, icloud, yahoo, fastmail, zoho, custom, capture",
        ),
        (
            "tenants:\n  a.b:\n    provider: capture\n    domains: ['*']\n",
            'tenants."a.b": line 2: a tenant name is letters, digits, - and _',
        ),
    ],
)
def test_wrong_values(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert any(p.endswith(expected) for p in found), found


def test_every_problem_is_reported_in_file_order(tmp_path: Path) -> None:
    assert problems(
        tmp_path,
        """
        spool:
          max_message_size: lots
        log_level: loud
        listen:
          - address: 127.0.0.1:0
        """,
    ) == [
        "spool.max_message_size: line 2: expected a size like 35MiB, 10MB or a number of bytes, "
        'got "lots"',
        'log_level: line 3: expected one of debug, info, warning, error, got "loud"',
        "listen[0].address: line 5: expected a listen address like 127.0.0.1:2525, [::1]:2525 or "
        'unix:/run/relayd/smtp.sock, got "127.0.0.1:0": the port must be 1-65535',
    ]


# -- sizes and durations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("35MiB", 35 * 2**20),
        ("10MB", 10 * 10**6),
        ("1024", 1024),
        ("4KiB", 4096),
        ("4KB", 4000),
        ("2GiB", 2 * 2**30),
        ("2GB", 2 * 10**9),
        ("35mib", 35 * 2**20),
        ("35 MiB", 35 * 2**20),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "MiB", "35M", "3.5MiB", "-1", "35 MiB ", "35TiB"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("5m", 300), ("1h", 3600), ("5d", 432000), ("90", 90), ("0", 0), ("1h30m", 5400)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5 m", "5x", "1.5h", "h", "-5m", "5m "])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_sizes_and_durations_in_the_file(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        spool:
          max_message_size: 10MB
          retry: {first: 30s, max: 2h, give_up_after: 3d}
          delay_warning: 4h
        """,
    )
    assert config.spool.max_message_size == 10_000_000
    retry = config.spool.retry
    assert (retry.first, retry.max, retry.give_up_after) == (30, 7200, 3 * 86400)
    assert config.spool.delay_warning == 4 * 3600


# -- addresses, patterns, networks, listen addresses --------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("alice", "an address has exactly one @"),
        ("a@b@example.com", "an address has exactly one @"),
        ("al ice@example.com", "spaces are not allowed inside an address"),
        ("@example.com", "the part before @ is empty"),
        ("alice@", "the domain is empty"),
        ("alice@example..com", "the domain has an empty label"),
        ("<alice@example.com>", "'<' is not allowed in an address"),
    ],
)
def test_bad_addresses(tmp_path: Path, address: str, reason: str) -> None:
    text = ACCOUNT.replace("a@example.com", f'"{address}"')
    assert (
        f"tenants.t.accounts[0].address: line 5: expected an address like user@example.com, "
        f'got "{address}": {reason}'
    ) in problems(tmp_path, text)


def test_address_patterns(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        clients:
          anonymous:
            may_send_as: [User@Example.com, "*@example.com", "*@*.example.com", "*"]
        """,
    )
    assert config.clients[ANONYMOUS].may_send_as == (
        AddressPattern("user@example.com"),
        AddressPattern("*@example.com"),
        AddressPattern("*@*.example.com"),
        AddressPattern("*"),
    )


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("*@*", 'to match any address write "*"'),
        ("example.com", 'a pattern is user@domain, *@domain, *@*.domain or "*"'),
        ("a b@example.com", "spaces are not allowed inside an address"),
    ],
)
def test_bad_patterns(tmp_path: Path, pattern: str, reason: str) -> None:
    assert problems(tmp_path, f'clients:\n  anonymous:\n    may_send_as: ["{pattern}"]\n') == [
        "clients.anonymous.may_send_as[0]: line 3: expected an address pattern: "
        f'user@example.com, *@example.com, *@*.example.com or *, got "{pattern}": {reason}'
    ]


def test_domains_become_patterns(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        tenants:
          c:
            provider: capture
            domains: [Example.com, "*.example.org", "*"]
        """,
    )
    assert config.tenants[0].domains == (
        AddressPattern("*@example.com"),
        AddressPattern("*@*.example.org"),
        AddressPattern("*"),
    )


def test_domain_written_as_address(tmp_path: Path) -> None:
    text = "tenants:\n  c:\n    provider: capture\n    domains: [a@example.com]\n"
    assert problems(tmp_path, text) == [
        "tenants.c.domains[0]: line 4: expected a domain like example.com, *.example.com or *, "
        'got "a@example.com": write the domain alone, e.g. example.com'
    ]


def test_listen_addresses(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        listen:
          - address: "[::1]:2525"
          - address: localhost:2526
          - address: unix:/run/relayd/smtp.sock
        """,
    )
    assert [(x.tcp_host, x.tcp_port, x.unix_path) for x in config.listeners] == [
        ("::1", 2525, None),
        ("localhost", 2526, None),
        (None, None, Path("/run/relayd/smtp.sock")),
    ]
    assert all(x.is_loopback for x in config.listeners)
    assert [x.where for x in config.listeners] == [
        "listen[0]: line 2",
        "listen[1]: line 3",
        "listen[2]: line 4",
    ]


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("::1:2525", "write IPv6 addresses in brackets, e.g. [::1]:2525"),
        ("127.0.0.1", "missing :port"),
        ("mail.example.com:25", "the host must be an IP address or localhost"),
        ("127.0.0.1:smtp", "the port must be 1-65535"),
        ("unix:", "the socket path is empty"),
    ],
)
def test_bad_listen_addresses(tmp_path: Path, address: str, reason: str) -> None:
    assert problems(tmp_path, f'listen:\n  - address: "{address}"\n') == [
        "listen[0].address: line 2: expected a listen address like 127.0.0.1:2525, [::1]:2525 "
        f'or unix:/run/relayd/smtp.sock, got "{address}": {reason}'
    ]


def test_duplicate_listener(tmp_path: Path) -> None:
    text = "listen:\n  - address: 127.0.0.1:25\n  - address: 127.0.0.1:25\n"
    assert problems(tmp_path, text) == ["listen[1]: line 3: 127.0.0.1:25 is also listen[0]: line 2"]


def test_networks(tmp_path: Path) -> None:
    text = """
    clients:
      scanner:
        networks: [192.168.10.0/24, "2001:db8::/32", 10.1.2.3]
      printer:
        networks: [192.168.10.5/24]
    """
    assert problems(tmp_path, text) == [
        "clients.printer.networks[0]: line 5: expected a network like 192.168.10.0/24, "
        'got "192.168.10.5/24": host bits are set; did you mean 192.168.10.0/24?'
    ]
    config = load(tmp_path, text.replace("192.168.10.5/24", "192.168.11.0/24"))
    assert [str(n) for n in config.clients["scanner"].networks] == [
        "192.168.10.0/24",
        "2001:db8::/32",
        "10.1.2.3/32",
    ]


def test_clients(tmp_path: Path) -> None:
    encoded = hash_password("pw")
    config = load(
        tmp_path,
        f"""
        clients:
          crm:
            password_hash: "{encoded}"
            may_send_as: [sales@acme.example]
          webapp:
            unix_users: [www-data, "1001"]
        """,
    )
    assert config.clients["crm"].password_hash == encoded
    assert config.clients["webapp"].unix_users == ("www-data", "1001")
    assert config.clients["webapp"].may_send_as == ()


def test_password_hash_format(tmp_path: Path) -> None:
    found = problems(tmp_path, 'clients:\n  crm:\n    password_hash: "$scrypt$..."\n')
    assert found == [
        "clients.crm.password_hash: line 3: not a hash made by `relayd hash-password`: "
        "expected $scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt>$<hash>"
    ]


def test_anonymous_takes_only_may_send_as(tmp_path: Path) -> None:
    assert problems(tmp_path, "clients:\n  anonymous:\n    networks: [10.0.0.0/8]\n") == [
        "clients.anonymous.networks: line 3: anonymous is whoever is not identified otherwise; "
        "it takes only may_send_as (give a named client networks or unix_users instead)"
    ]


def test_rewrite_senders(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        rewrite_senders:
          root: alerts@acme.example
          "*@localhost": noreply@acme.example
        """,
    )
    assert config.rewrite_senders == (
        (AddressPattern("root"), "alerts@acme.example"),
        (AddressPattern("*@localhost"), "noreply@acme.example"),
    )
    assert problems(tmp_path, "rewrite_senders:\n  root: alerts\n") == [
        "rewrite_senders.root: line 2: expected an address like user@example.com, "
        'got "alerts": an address has exactly one @'
    ]


# -- whitespace -------------------------------------------------------------------------------


def test_whitespace_is_warned_about_then_stripped(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        helo_name: " relay.example "
        clients:
          anonymous:
            may_send_as: ["noreply@example.com "]
        tenants:
          t:
            provider: custom
            smtp: {host: " mail.example.com"}
            accounts:
              - address: " a@example.com"
                username: "a "
                password: {env: PW}
                aliases: ["b@example.com\\t"]
        """,
    )
    assert config.helo_name == "relay.example"
    assert config.clients[ANONYMOUS].may_send_as == (AddressPattern("noreply@example.com"),)
    (account,) = config.accounts()
    assert (account.address, account.username, account.aliases) == (
        "a@example.com",
        "a",
        ("b@example.com",),
    )
    assert account.smtp is not None and account.smtp.host == "mail.example.com"
    assert config.warnings == (
        'helo_name: line 1: leading/trailing whitespace removed from " relay.example "',
        "clients.anonymous.may_send_as[0]: line 4: leading/trailing whitespace removed from "
        '"noreply@example.com "',
        'tenants.t.smtp.host: line 8: leading/trailing whitespace removed from " mail.example.com"',
        'tenants.t.accounts[0].address: line 10: leading/trailing whitespace removed from " '
        'a@example.com"',
        'tenants.t.accounts[0].username: line 11: leading/trailing whitespace removed from "a "',
        "tenants.t.accounts[0].aliases[0]: line 13: leading/trailing whitespace removed from "
        '"b@example.com\\t"',
    )


# -- secrets ----------------------------------------------------------------------------------


def _secret_config(tmp_path: Path, secret: str) -> Path:
    return write(tmp_path, ACCOUNT.replace("{env: PW}", secret))


def test_secret_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "secrets" / "pw"
    secret_file.parent.mkdir()
    secret_file.write_text(SECRET + "\n\n")
    secret_file.chmod(0o640)
    config = load_config(_secret_config(tmp_path, "{file: secrets/pw}"))
    password = config.accounts()[0].password
    assert password is not None
    assert password.reveal() == SECRET + "\n"  # exactly one trailing newline stripped
    assert password.source == f"file:{secret_file}"
    assert SECRET not in repr(config) and SECRET not in str(password)


def test_secret_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    secret_file = tmp_path / "pw"
    secret_file.write_text(SECRET)
    secret_file.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        load_config(_secret_config(tmp_path, "{file: pw}"))
    assert info.value.problems == [
        f"tenants.t.accounts[0].password: line 6: secret file {secret_file} is readable by other "
        f"users (mode 0644); run: chmod o-rwx {secret_file}"
    ]
    assert SECRET not in str(info.value)


def test_secret_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_secret_config(tmp_path, "{file: /nonexistent/pw}"))
    assert info.value.problems == [
        "tenants.t.accounts[0].password: line 6: cannot read secret file /nonexistent/pw: "
        "No such file or directory"
    ]


def test_secret_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(_secret_config(tmp_path, "{env: PW}"))
    password = config.accounts()[0].password
    assert password is not None and password.reveal() == SECRET and password.source == "env:PW"
    monkeypatch.delenv("PW")
    with pytest.raises(ConfigError) as info:
        load_config(_secret_config(tmp_path, "{env: PW}"))
    assert info.value.problems == [
        "tenants.t.accounts[0].password: line 6: environment variable PW is not set"
    ]


def test_secret_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "gmail-pw").write_text(SECRET + "\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = load_config(_secret_config(tmp_path, "{credential: gmail-pw}"))
    password = config.accounts()[0].password
    assert password is not None
    assert (password.reveal(), password.source) == (SECRET, "credential:gmail-pw")
    with pytest.raises(ConfigError) as info:
        load_config(_secret_config(tmp_path, "{credential: other}"))
    assert info.value.problems == [
        "tenants.t.accounts[0].password: line 6: credential other is not readable "
        f"({creds}/other: No such file or directory); with systemd, add "
        "LoadCredential=other:/path/to/secret to relayd.service"
    ]


def test_secret_credential_default_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_secret_config(tmp_path, "{credential: relayd-test-none}"))
    assert "(/run/credentials/relayd.service/relayd-test-none: " in info.value.problems[0]


def test_secret_literal_is_a_warning(tmp_path: Path) -> None:
    config = load_config(_secret_config(tmp_path, SECRET))
    password = config.accounts()[0].password
    assert password is not None and password.source == "literal"
    assert config.warnings == (
        "tenants.t.accounts[0].password: line 6: secret written in the config file itself; keep "
        "it in a file ({file: PATH}, mode 0640) or a systemd credential ({credential: NAME}) "
        "instead",
    )


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("{env: PW, file: x}", "write exactly one of env, file or credential"),
        ("{}", "write exactly one of env, file or credential"),
        (
            "[a]",
            "expected a secret value: {env: NAME}, {file: PATH}, {credential: NAME} or a string, "
            "got a list",
        ),
    ],
)
def test_bad_secret_forms(tmp_path: Path, secret: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_secret_config(tmp_path, secret))
    assert info.value.problems == [f"tenants.t.accounts[0].password: line 6: {message}"]


def test_spool_encryption_needs_a_key_of_real_strength(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [problem] = problems(tmp_path, "spool:\n  encrypt_at_rest: true\n")
    assert problem == (
        "spool.encrypt_at_rest: line 2: encrypt_at_rest: true needs spool.key "
        "(a secret value, e.g. {credential: relayd-spool-key})"
    )
    [problem] = problems(tmp_path, "spool:\n  encrypt_at_rest: true\n  key: {env: PW}\n")
    assert problem.startswith("spool.key: line 3: too short for a key: give at least 32 ")
    monkeypatch.setenv("SPOOL_KEY", "k" * 32)
    config = load(tmp_path, "spool:\n  encrypt_at_rest: true\n  key: {env: SPOOL_KEY}\n")
    assert config.spool.encrypt_at_rest is True
    assert config.spool.key is not None and config.spool.key.source == "env:SPOOL_KEY"
    # Turned off, the key stays configured to open the files sealed meanwhile.
    config = load(tmp_path, "spool:\n  encrypt_at_rest: false\n  key: {env: SPOOL_KEY}\n")
    assert config.spool.encrypt_at_rest is False and config.spool.key is not None


# -- presets and merging ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "smtp", "imap", "limits"),
    [
        ("gmail", ("smtp.gmail.com", 465, TlsMode.IMPLICIT), "imap.gmail.com", (3, 0, 100)),
        (
            "google-workspace",
            ("smtp.gmail.com", 465, TlsMode.IMPLICIT),
            "imap.gmail.com",
            (3, 0, 100),
        ),
        (
            "microsoft365",
            ("smtp.office365.com", 587, TlsMode.STARTTLS),
            "outlook.office365.com",
            (3, 30, 0),
        ),
        (
            "outlook",
            ("smtp.office365.com", 587, TlsMode.STARTTLS),
            "outlook.office365.com",
            (3, 30, 0),
        ),
        ("icloud", ("smtp.mail.me.com", 587, TlsMode.STARTTLS), "imap.mail.me.com", (3, 0, 0)),
        ("yahoo", ("smtp.mail.yahoo.com", 465, TlsMode.IMPLICIT), "imap.mail.yahoo.com", (3, 0, 0)),
        ("fastmail", ("smtp.fastmail.com", 465, TlsMode.IMPLICIT), "imap.fastmail.com", (3, 0, 0)),
        ("zoho", ("smtp.zoho.com", 465, TlsMode.IMPLICIT), "imap.zoho.com", (3, 0, 0)),
    ],
)
def test_presets_fill_defaults(
    tmp_path: Path,
    provider: str,
    smtp: tuple[str, int, TlsMode],
    imap: str,
    limits: tuple[int, int, int],
) -> None:
    (account,) = load(tmp_path, ACCOUNT.replace("gmail", provider)).accounts()
    assert account.provider == provider
    assert (
        account.smtp is not None
        and (account.smtp.host, account.smtp.port, account.smtp.tls) == smtp
    )
    assert account.imap is not None
    assert (account.imap.host, account.imap.port, account.imap.tls) == (imap, 993, TlsMode.IMPLICIT)
    got = account.limits
    assert (got.max_connections, got.max_messages_per_minute, got.max_recipients) == limits
    assert account.username == "a@example.com"
    assert account.sent_copy is SentCopy.AUTO


def test_preset_sent_copy_flags() -> None:
    files_itself = {name for name, p in PRESETS.items() if p.files_sent_copy_itself}
    assert files_itself == {"gmail", "google-workspace", "microsoft365", "outlook"}


def test_account_overrides_tenant_key_by_key(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        tenants:
          t:
            provider: microsoft365
            smtp: {port: 25, tls: starttls}
            imap: {sent_folder: Sent Items}
            limits: {max_recipients: 500, max_connections: 2}
            sent_copy: always
            from_name: ACME
            oauth:
              client_id: app-id
              tenant_id: acme.example
              client_secret: {env: PW}
              flow: client_credentials
            accounts:
              - address: alice@acme.example
                oauth: {flow: delegated, scopes: ["https://outlook.office.com/SMTP.Send"]}
                smtp: {host: smtp-alt.office365.com}
                limits: {max_connections: 1}
                sent_copy: never
                from_name: Alice
              - address: bob@acme.example
              - address: scanner@acme.example
                password: {env: PW}
        """,
    )
    alice, bob, scanner = config.accounts()
    assert alice.smtp is not None and bob.smtp is not None
    assert (alice.smtp.host, alice.smtp.port, alice.smtp.tls) == (
        "smtp-alt.office365.com",
        25,
        TlsMode.STARTTLS,
    )
    assert (bob.smtp.host, bob.smtp.port) == ("smtp.office365.com", 25)
    assert alice.imap is not None and alice.imap.sent_folder == "Sent Items"
    assert alice.imap.host == "outlook.office365.com"
    assert (
        alice.limits.max_connections,
        alice.limits.max_messages_per_minute,
        alice.limits.max_recipients,
    ) == (1, 30, 500)
    assert bob.limits.max_connections == 2
    assert (alice.sent_copy, bob.sent_copy) == (SentCopy.NEVER, SentCopy.ALWAYS)
    assert (alice.from_name, bob.from_name) == ("Alice", "ACME")
    # oauth merged key by key: the account's flow and scopes over the tenant's app registration
    assert alice.oauth is not None and bob.oauth is not None
    assert (alice.oauth.flow, alice.oauth.client_id, alice.oauth.tenant_id) == (
        "delegated",
        "app-id",
        "acme.example",
    )
    assert alice.oauth.client_secret is not None and alice.oauth.client_secret.reveal() == SECRET
    assert alice.oauth.scopes == ("https://outlook.office.com/SMTP.Send",)
    assert (bob.oauth.flow, bob.password) == ("client_credentials", None)
    # an account with its own password does not inherit the tenant's oauth
    assert scanner.oauth is None and scanner.password is not None
    assert [a.where for a in config.accounts()] == [
        "tenants.t.accounts[0]: line 15",
        "tenants.t.accounts[1]: line 21",
        "tenants.t.accounts[2]: line 22",
    ]
    assert config.tenants[0].where == "tenants.t: line 2"


def test_custom_provider(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        tenants:
          hosting:
            provider: custom
            smtp: {host: mail.host.example, ca_file: ca.pem}
            accounts:
              - address: info@host.example
                password: {env: PW}
              - address: ops@host.example
                password: {env: PW}
                smtp: {port: 465}
                imap: {host: imap.host.example, username: ops-archive, password: {env: PW}}
        """,
    )
    info, ops = config.accounts()
    assert info.smtp is not None and ops.smtp is not None
    assert (info.smtp.host, info.smtp.port, info.smtp.tls, info.smtp.ca_file) == (
        "mail.host.example",
        587,
        TlsMode.STARTTLS,
        tmp_path / "ca.pem",
    )
    assert (ops.smtp.port, ops.smtp.tls) == (465, TlsMode.IMPLICIT)
    assert info.imap is None  # no imap → no Sent copy
    assert ops.imap is not None
    assert (ops.imap.host, ops.imap.port, ops.imap.tls, ops.imap.username) == (
        "imap.host.example",
        993,
        TlsMode.IMPLICIT,
        "ops-archive",
    )


def test_custom_provider_needs_smtp(tmp_path: Path) -> None:
    text = """
    tenants:
      hosting:
        provider: custom
        accounts:
          - address: info@host.example
            password: {env: PW}
            imap: {sent_folder: Sent}
            sent_copy: always
    """
    assert problems(tmp_path, text) == [
        "tenants.hosting: line 2: smtp.host is missing: provider custom has no default server; "
        "set smtp: {host: ..., port: ..., tls: ...} on the tenant or the account",
        "tenants.hosting.accounts[0]: line 5: imap.host is missing (the other imap keys need it)",
        "tenants.hosting.accounts[0]: line 5: sent_copy: always needs imap settings (imap.host)",
    ]


def test_port_and_tls_mixed_up_is_a_warning(tmp_path: Path) -> None:
    config = load(tmp_path, ACCOUNT + "    smtp: {port: 587}\n")
    assert config.warnings == (
        "tenants.t.smtp.port: line 7: smtp port 587 with tls: implicit; port 465 normally means "
        "implicit and 587 starttls",
    )


# -- credentials and OAuth --------------------------------------------------------------------


def test_account_needs_credentials(tmp_path: Path) -> None:
    text = "tenants:\n  t:\n    provider: gmail\n    accounts:\n      - address: a@example.com\n"
    assert problems(tmp_path, text) == [
        "tenants.t.accounts[0]: line 5: the account needs a password (e.g. an app password) or "
        "oauth, on itself or through its tenant's oauth"
    ]
    both = ACCOUNT + "        oauth: {flow: delegated, client_id: x, client_secret: {env: PW}}\n"
    assert problems(tmp_path, both) == [
        "tenants.t.accounts[0]: line 5: an account logs in with password or oauth, not both"
    ]


@pytest.mark.parametrize(
    ("provider", "oauth", "expected"),
    [
        (
            "gmail",
            "{flow: client_credentials, client_id: x, client_secret: {env: PW}}",
            "tenants.t.accounts[0].oauth.flow: line 6: provider gmail does not support oauth flow "
            "client_credentials; use one of delegated, service_account, refresh_token",
        ),
        (
            "icloud",
            "{flow: refresh_token, token_url: 'https://t.example/token', client_id: x}",
            "tenants.t.accounts[0].oauth.flow: line 6: provider icloud does not support oauth flow "
            "refresh_token; it logs in with a password",
        ),
        (
            "microsoft365",
            "{flow: client_credentials, client_id: x}",
            "tenants.t.accounts[0]: line 5: oauth flow client_credentials needs tenant_id (or "
            "authority), client_secret or certificate (in the tenant's or the account's oauth)",
        ),
        (
            "microsoft365",
            "{flow: delegated, client_id: x, tenant_id: y, scopes: [offline_access, x]}",
            "tenants.t.accounts[0].oauth.scopes: line 6: remove offline_access: msal adds it "
            "itself and refuses it when passed",
        ),
        (
            "custom",
            "{flow: refresh_token, client_id: x}",
            "tenants.t.accounts[0]: line 5: oauth flow refresh_token needs token_url (in the "
            "tenant's or the account's oauth)",
        ),
        (
            "custom",
            "{flow: refresh_token, client_id: x, token_url: 'http://auth.example/token'}",
            "tenants.t.accounts[0].oauth.token_url: line 6: expected an https URL, got "
            '"http://auth.example/token": use https',
        ),
        (
            "gmail",
            "{flow: service_account, service_account_key: {env: PW}}",
            "tenants.t.accounts[0].oauth.service_account_key: line 6: env:PW is not a Google "
            'service-account JSON key (expected a JSON object with "type": "service_account")',
        ),
        (
            "gmail",
            "{client_id: x}",
            "tenants.t.accounts[0]: line 5: oauth.flow is missing; expected one of delegated, "
            "client_credentials, service_account, refresh_token",
        ),
    ],
)
def test_oauth_problems(tmp_path: Path, provider: str, oauth: str, expected: str) -> None:
    text = f"""
    tenants:
      t:
        provider: {provider}
        accounts:
          - address: a@example.com
            oauth: {oauth}
    """
    if provider == "custom":
        text += "    smtp: {host: mail.example.com}\n"
    assert problems(tmp_path, text) == [expected]


def test_duplicate_sender(tmp_path: Path) -> None:
    text = """
    tenants:
      a:
        provider: gmail
        accounts:
          - address: alice@example.com
            password: {env: PW}
            aliases: [info@example.com]
      b:
        provider: fastmail
        accounts:
          - address: Alice@Example.com
            password: {env: PW}
          - address: bob@example.com
            password: {env: PW}
            aliases: [info@example.com]
    """
    assert problems(tmp_path, text) == [
        "tenants.b.accounts[0].address: line 11: sender alice@example.com is also claimed by "
        "tenants.a.accounts[0].address: line 5; a sender may belong to only one account",
        "tenants.b.accounts[1].aliases[0]: line 15: sender info@example.com is also claimed by "
        "tenants.a.accounts[0].aliases[0]: line 7; a sender may belong to only one account",
    ]


# -- routing by domain ------------------------------------------------------------------------


def test_domain_routing_templates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SA_KEY", '{"type": "service_account", "client_email": "x@y"}')
    config = load(
        tmp_path,
        """
        state_directory: state
        tenants:
          acme:
            provider: microsoft365
            domains: [acme.example]
            oauth: {flow: client_credentials, client_id: x, tenant_id: y, client_secret: {env: PW}}
          partners:
            provider: google-workspace
            domains: [partners.example]
            oauth:
              flow: service_account
              service_account_key: {env: SA_KEY}
          staging:
            provider: capture
            domains: ["*"]
        """,
    )
    acme, partners, staging = config.tenants
    for tenant in (acme, partners, staging):
        assert tenant.accounts == ()
        assert tenant.domain_account is not None
        assert (tenant.domain_account.address, tenant.domain_account.username) == ("", "")
    assert acme.domain_account is not None and acme.domain_account.oauth is not None
    assert acme.domain_account.oauth.flow == "client_credentials"
    assert acme.domain_account.smtp is not None
    assert acme.domain_account.smtp.host == "smtp.office365.com"
    assert acme.domain_account.where == "tenants.acme.domains: line 5"
    assert partners.domain_account is not None and partners.domain_account.oauth is not None
    assert partners.domain_account.oauth.flow == "service_account"
    capture = staging.domain_account
    assert capture is not None
    assert (capture.smtp, capture.imap, capture.oauth) == (None, None, None)
    assert capture.capture_path == tmp_path / "state" / "capture"
    assert capture.is_capture


@pytest.mark.parametrize(
    "oauth",
    ["", "    oauth: {flow: delegated, client_id: x, client_secret: {env: PW}}\n"],
)
def test_domain_routing_needs_app_only_credentials(tmp_path: Path, oauth: str) -> None:
    text = "tenants:\n  t:\n    provider: gmail\n    domains: [example.com]\n" + oauth
    assert problems(tmp_path, text) == [
        "tenants.t.domains: line 4: routing by domain needs app-only credentials on the tenant: "
        "oauth flow client_credentials (Microsoft) or service_account (Google), or provider "
        "capture; otherwise list each sender under accounts"
    ]


def test_a_domain_belongs_to_one_tenant(tmp_path: Path) -> None:
    text = """
    tenants:
      a:
        provider: capture
        domains: [example.com]
      b:
        provider: capture
        domains: [EXAMPLE.com]
    """
    assert problems(tmp_path, text) == [
        "tenants.b.domains[0]: line 7: domain *@example.com is also claimed by "
        "tenants.a.domains[0]: line 4; a domain may belong to only one tenant"
    ]


def test_capture_provider(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        tenants:
          staging:
            provider: capture
            capture: {path: maildir}
            accounts:
              - address: app@example.com
        """,
    )
    (account,) = config.accounts()
    assert account.capture_path == tmp_path / "maildir"
    assert (account.smtp, account.imap, account.password, account.oauth) == (None, None, None, None)
    hint = "provider capture delivers into a local Maildir and logs in nowhere; remove this key"
    assert problems(
        tmp_path,
        """
        tenants:
          staging:
            provider: capture
            smtp: {host: mail.example.com}
            accounts:
              - address: app@example.com
                password: {env: PW}
          real:
            provider: gmail
            capture: {path: x}
        """,
    ) == [
        f"tenants.staging.smtp: line 4: {hint}",
        f"tenants.staging.accounts[0].password: line 7: {hint}",
        "tenants.real.capture: line 10: capture is only for provider capture",
    ]


# -- security rules ---------------------------------------------------------------------------


LISTENER = """
listen:
  - address: {address}
    auth: {auth}
    tls: {tls}
{extra}clients:
  anonymous:
    may_send_as: {anonymous}
  scanner:
    networks: [192.168.10.0/24]
    may_send_as: [scanner@example.com]
  crm:
    password_hash: "{hash}"
"""
RULE = (
    "a listener beyond loopback needs auth: required with tls: starttls or implicit; or, for "
    "devices that cannot authenticate, clients restricted by networks, "
    "clients.anonymous.may_send_as empty and no AUTH without TLS"
)
CERT = "    certificate: tls/cert.pem\n    private_key: tls/key.pem\n"


@pytest.mark.parametrize(
    ("address", "auth", "tls", "extra", "anonymous", "expected"),
    [
        ("0.0.0.0:587", "required", "starttls", CERT, "[x@example.com]", None),
        ("0.0.0.0:465", "required", "implicit", CERT, "[x@example.com]", None),
        ("192.168.10.1:25", "none", "none", "", "[]", None),
        ("192.168.10.1:587", "optional", "starttls", CERT, "[]", None),
        ("127.0.0.1:25", "optional", "none", "", "[x@example.com]", None),
        ("'[::1]:25'", "none", "none", "", "['*']", None),
        (
            "0.0.0.0:587",
            "required",
            "none",
            "",
            "[]",
            "0.0.0.0:587 is reachable beyond loopback without TLS: passwords would cross the "
            f"network in clear text; {RULE}",
        ),
        (
            "192.168.10.1:25",
            "none",
            "none",
            "",
            "[x@example.com]",
            "192.168.10.1:25 is reachable beyond loopback and anyone who reaches it could send as "
            f"clients.anonymous.may_send_as: {RULE}",
        ),
        (
            "192.168.10.1:25",
            "optional",
            "none",
            "",
            "[]",
            "192.168.10.1:25 is reachable beyond loopback and auth: optional without TLS would "
            f"take passwords in clear text: {RULE}",
        ),
        (
            "'[::]:25'",
            "none",
            "starttls",
            CERT,
            "['*']",
            "[::]:25 is reachable beyond loopback and anyone who reaches it could send as "
            f"clients.anonymous.may_send_as: {RULE}",
        ),
        (
            "127.0.0.1:587",
            "required",
            "starttls",
            "",
            "[]",
            "tls: starttls needs certificate and private_key",
        ),
        (
            "unix:/run/x.sock",
            "none",
            "implicit",
            CERT,
            "[]",
            "a unix socket listener takes tls: none",
        ),
    ],
)
def test_listener_security(
    tmp_path: Path,
    address: str,
    auth: str,
    tls: str,
    extra: str,
    anonymous: str,
    expected: str | None,
) -> None:
    text = LISTENER.format(
        address=address,
        auth=auth,
        tls=tls,
        extra=extra,
        anonymous=anonymous,
        hash=hash_password("x"),
    )
    if expected is None:
        load(tmp_path, text)
    else:
        assert problems(tmp_path, text) == [f"listen[0]: line 2: {expected}"]


def test_beyond_loopback_needs_a_networks_client(tmp_path: Path) -> None:
    text = "listen:\n  - address: 10.0.0.1:25\n    auth: none\n"
    assert problems(tmp_path, text) == [
        f"listen[0]: line 2: 10.0.0.1:25 is reachable beyond loopback and no client has "
        f"networks: {RULE}"
    ]


@pytest.mark.parametrize(
    ("where", "host", "expected"),
    [
        ("tenant", "mail.example.com", "tenants.t.smtp.tls: line 4"),
        ("account", "10.0.0.5", "tenants.t.accounts[0].smtp.tls: line 8"),
        ("tenant", "127.0.0.1", None),
        ("tenant", "localhost", None),
        ("account", "::1", None),
    ],
)
def test_upstream_without_tls_only_on_loopback(
    tmp_path: Path, where: str, host: str, expected: str | None
) -> None:
    server = f"{{host: '{host}', port: 25, tls: none}}"
    text = f"""
    tenants:
      t:
        provider: custom
        smtp: {server if where == "tenant" else "{host: mail.example.com}"}
        accounts:
          - address: a@example.com
            password: {{env: PW}}
            smtp: {server if where == "account" else "{}"}
    """
    if expected is None:
        (account,) = load(tmp_path, text).accounts()
        assert account.smtp is not None and account.smtp.tls is TlsMode.NONE
        return
    bare = host.strip("[]")
    assert problems(tmp_path, text) == [
        f"{expected}: tls: none is allowed only for an upstream on a loopback address "
        f"(127.0.0.0/8, ::1, localhost), not smtp host {bare}: passwords and mail would cross "
        "the network in clear text"
    ]


def test_imap_without_tls_refused(tmp_path: Path) -> None:
    text = ACCOUNT + "    imap: {tls: none}\n"
    assert problems(tmp_path, text) == [
        "tenants.t.imap.tls: line 7: tls: none is allowed only for an upstream on a loopback "
        "address (127.0.0.0/8, ::1, localhost), not imap host imap.gmail.com: passwords and "
        "mail would cross the network in clear text"
    ]


# -- alerts, metrics, YAML features -----------------------------------------------------------


def test_alerts_and_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK", "https://hooks.example/relayd/T0KEN\n")
    config = load(
        tmp_path,
        ACCOUNT
        + """
alerts:
  via: A@example.com
  email: ops@example.com
  webhook: {env: HOOK}
metrics: {address: "[::1]:9425"}
""",
    )
    assert config.alerts is not None and config.alerts.webhook is not None
    assert (config.alerts.via, config.alerts.email, config.alerts.webhook.reveal()) == (
        "a@example.com",
        "ops@example.com",
        "https://hooks.example/relayd/T0KEN",
    )
    assert "T0KEN" not in repr(config.alerts)
    assert config.metrics is not None and (config.metrics.address, config.metrics.port) == (
        "::1",
        9425,
    )
    assert config.warnings == ()
    assert problems(
        tmp_path, ACCOUNT + "alerts:\n  via: nobody@example.com\n  email: ops@example.com\n"
    ) == ["alerts.via: line 8: nobody@example.com is not an account (or alias) of any tenant"]


def test_alerts_webhook_is_a_secret_value(tmp_path: Path) -> None:
    # Written in the file, it still works, with the warning every literal secret gets.
    config = load(tmp_path, ACCOUNT + "alerts:\n  webhook: https://hooks.example/x\n")
    assert config.alerts is not None and config.alerts.webhook is not None
    assert config.alerts.webhook.reveal() == "https://hooks.example/x"
    assert [w for w in config.warnings if w.startswith("alerts.webhook")] == [
        "alerts.webhook: line 8: secret written in the config file itself; keep it in a file "
        "({file: PATH}, mode 0640) or a systemd credential ({credential: NAME}) instead"
    ]
    # A source holding something else is named, and its content is not shown.
    hook = tmp_path / "hook"
    hook.write_text(SECRET + "\n")
    hook.chmod(0o600)
    assert problems(tmp_path, ACCOUNT + f"alerts:\n  webhook: {{file: {hook}}}\n") == [
        f"alerts.webhook: line 8: file:{hook} is not an http(s) URL"
    ]


TENANT_ALERTS = """
tenants:
  acme:
    provider: gmail
    accounts:
      - address: billing@acme.example
        password: {env: PW}
    alerts:
      via: billing@acme.example
      email: it@acme.example
      webhook: {env: HOOK}
  globex:
    provider: gmail
    accounts:
      - address: sales@globex.example
        password: {env: PW}
"""


def test_a_tenant_has_its_own_alerts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK", "https://hooks.acme.example/relayd")
    config = load(tmp_path, TENANT_ALERTS)
    acme, globex = config.tenants
    assert config.alerts is None and globex.alerts is None
    assert acme.alerts is not None and acme.alerts.webhook is not None
    assert (acme.alerts.via, acme.alerts.email, acme.alerts.webhook.reveal()) == (
        "billing@acme.example",
        "it@acme.example",
        "https://hooks.acme.example/relayd",
    )
    # Its alert emails go through one of its own mailboxes, never another tenant's.
    other = TENANT_ALERTS.replace("via: billing@acme.example", "via: sales@globex.example")
    assert problems(tmp_path, other) == [
        "tenants.acme.alerts.via: line 8: sales@globex.example is not an account (or alias) of "
        "tenant acme"
    ]
    no_via = TENANT_ALERTS.replace("      via: billing@acme.example\n", "")
    assert problems(tmp_path, no_via) == [
        "tenants.acme.alerts.email: line 8: alert emails need via, an account of tenant acme "
        "that sends them"
    ]


# -- web: the connect and operator pages ------------------------------------------------------

ADMIN_HASH = hash_password("admin-secret")
CONNECT_ACCOUNT = """
tenants:
  t:
    provider: gmail
    accounts:
      - address: a@example.com
        password: {connect: true}
"""


def test_web_listener(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        f"""
        web:
          address: 127.0.0.1:8425
          public_url: https://relay.example/relayd/
          admins: {{ops: "{ADMIN_HASH}"}}
        """,
    )
    web = config.web
    assert web is not None
    assert (web.address, web.port, web.public_url) == (
        "127.0.0.1",
        8425,
        "https://relay.example/relayd",
    )
    assert web.admins == {"ops": ADMIN_HASH}
    assert not web.tls and web.where == "web: line 1"
    assert load(tmp_path, "log_level: info\n").web is None


def test_web_defaults_and_https(tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    plain = load(tmp_path, "web: {address: '[::1]:8425'}\n").web
    assert plain is not None and plain.public_url == "http://[::1]:8425"
    assert plain.admins == {}
    tls = load(
        tmp_path,
        """
        web:
          address: 0.0.0.0:8443
          certificate: tls/cert.pem
          private_key: tls/key.pem
        """,
    ).web
    assert tls is not None and tls.tls
    assert tls.certificate == tmp_path / "tls/cert.pem"
    assert tls.public_url == "https://0.0.0.0:8443"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "web: {address: 0.0.0.0:8425}\n",
            "web.address: line 1: 0.0.0.0:8425 is reachable beyond loopback: the web pages "
            "carry app passwords and admin credentials, so serve them with certificate and "
            "private_key (HTTPS), or listen on loopback behind a reverse proxy or an SSH tunnel",
        ),
        ("web: {public_url: https://r.example}\n", "web.address: line 1: missing; expected"),
        (
            "web: {address: 127.0.0.1:8425, public_url: http://relay.example}\n",
            "web.public_url: line 1: expected an https URL like https://relay.example, got "
            '"http://relay.example": use https',
        ),
        (
            "web: {address: 127.0.0.1:8425, public_url: 'https://r.example/?a=1'}\n",
            "no query or fragment",
        ),
        (
            "web: {address: 127.0.0.1:8425, certificate: cert.pem}\n",
            "web: line 1: certificate and private_key go together",
        ),
        (
            "web:\n  address: 127.0.0.1:8425\n  admins: {ops: plain-text}\n",
            "web.admins.ops: line 3: not a hash made by `relayd hash-password`",
        ),
        (
            f'web:\n  address: 127.0.0.1:8425\n  admins: {{"a:b": "{ADMIN_HASH}"}}\n',
            'web.admins."a:b": line 3: an admin name has no spaces or colons',
        ),
        (
            "web: {address: 127.0.0.1:8425, port: 1}\n",
            "web.port: line 1: unknown key; allowed keys: address, public_url, admins, "
            "certificate, private_key",
        ),
    ],
)
def test_web_problems(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert any(p.startswith(expected) or expected in p for p in found), found


def test_password_given_on_the_connect_page(tmp_path: Path) -> None:
    config = load(tmp_path, "web: {address: 127.0.0.1:8425}\n" + CONNECT_ACCOUNT)
    (account,) = config.accounts()
    assert account.connect_password and account.password is None and account.oauth is None
    (plain,) = load(tmp_path, ACCOUNT).accounts()
    assert not plain.connect_password


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            CONNECT_ACCOUNT,
            "tenants.t.accounts[0].password: line 6: password: {connect: true} needs the web "
            "listener, where the mailbox owner gives the password: add web: "
            "{address: ..., public_url: ...}",
        ),
        (
            "web: {address: 127.0.0.1:8425}\n" + CONNECT_ACCOUNT.replace("true", "false"),
            "tenants.t.accounts[0].password.connect: line 8: connect: false means no "
            "password; write a secret value instead",
        ),
        (
            "web: {address: 127.0.0.1:8425}\n" + CONNECT_ACCOUNT.replace("true", "maybe"),
            'tenants.t.accounts[0].password.connect: line 8: expected true or false, got "maybe"',
        ),
        (
            "web: {address: 127.0.0.1:8425}\n"
            + CONNECT_ACCOUNT.replace("connect: true", "connect: true, env: PW"),
            "tenants.t.accounts[0].password.env: line 8: unknown key; allowed keys: connect",
        ),
    ],
)
def test_password_connect_problems(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in problems(tmp_path, text)


def test_yaml_merge_keys(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        tenants:
          t:
            provider: gmail
            accounts:
              - &base
                address: a@example.com
                password: {env: PW}
                from_name: Base
              - <<: *base
                address: b@example.com
        """,
    )
    _, b = config.accounts()
    assert (b.address, b.from_name) == ("b@example.com", "Base")


# -- finding the file -------------------------------------------------------------------------


def test_find_config_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "log_level: info\n")
    assert find_config_path(str(path)) == path
    monkeypatch.setenv("RELAYD_CONFIG", str(path))
    assert find_config_path(None) == path
    assert find_config_path(str(LOCAL)) == LOCAL
    with pytest.raises(ConfigError, match="from -c"):
        find_config_path(str(tmp_path / "missing.yaml"))


def test_no_config_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from relayd.config import loader

    monkeypatch.setattr(loader, "DEFAULT_CONFIG_PATH", tmp_path / "absent.yaml")
    with pytest.raises(ConfigError) as info:
        find_config_path(None)
    assert "pass -c FILE, set RELAYD_CONFIG, or create /etc/relayd/relayd.yaml" in str(info.value)


# -- shipped files and the CLI ----------------------------------------------------------------


@pytest.fixture
def example_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(REPO / "etc" / "example-secrets"))
    monkeypatch.setenv("INFO_PASSWORD", "placeholder")


@pytest.mark.usefixtures("example_secrets")
def test_example_config_loads_cleanly() -> None:
    config = load_config(EXAMPLE)
    assert config.warnings == ()
    assert [t.name for t in config.tenants] == [
        "acme",
        "smallbiz",
        "partners",
        "workspace",
        "hosting",
        "staging",
    ]
    assert [a.address for a in config.accounts()] == [
        "alice@acme.example",
        "reports@acme.example",
        "scanner@acme.example",
        "owner@gmail.example",
        "frontdesk@gmail.example",
        "newsletter@workspace.example",
        "info@host.example",
        "ops@host.example",
    ]
    assert len(config.listeners) == 3
    assert set(config.clients) == {"anonymous", "crm", "webapp", "scanner"}
    assert config.tenants[0].domain_account is not None
    assert config.tenants[2].domain_account is not None
    assert config.alerts is not None and config.metrics is not None
    assert config.tokens_key is not None
    assert config.web is not None and config.web.public_url == "https://relay.acme.example"
    assert [a.address for a in config.accounts() if a.connect_password] == [
        "frontdesk@gmail.example"
    ]
    assert [(a.address, a.transport.value) for a in config.accounts() if a.api_url] == [
        ("reports@acme.example", "graph"),
        ("newsletter@workspace.example", "gmail_api"),
    ]


def test_example_config_needs_its_secrets() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(EXAMPLE)
    assert any("environment variable INFO_PASSWORD is not set" in p for p in info.value.problems)


def test_local_config_loads_cleanly() -> None:
    config = load_config(LOCAL)
    assert config.warnings == ()
    assert config.state_directory == Path("/tmp/relayd-local")
    (listener,) = config.listeners
    assert (listener.display, listener.auth, listener.tls) == (
        "127.0.0.1:2525",
        AuthPolicy.NONE,
        TlsMode.NONE,
    )
    assert config.clients[ANONYMOUS].may_send_as == (AddressPattern("*"),)
    (tenant,) = config.tenants
    assert (tenant.name, tenant.provider, tenant.domains) == (
        "local",
        "capture",
        (AddressPattern("*"),),
    )
    assert tenant.domain_account is not None
    assert tenant.domain_account.capture_path == Path("/tmp/relayd-local/capture")


@pytest.mark.usefixtures("example_secrets")
def test_cli_check_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-c", str(EXAMPLE), "check-config"]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("config OK: 6 tenants, 8 accounts, 3 listeners\n", "")
    assert cli.main(["check-config", "-c", str(LOCAL)]) == 0
    assert capsys.readouterr().out == "config OK: 1 tenants, 0 accounts, 1 listeners\n"


def test_cli_check_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "helo_name: ' x.example'\nlog_level: loud\n")
    assert cli.main(["check-config", "-c", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        'warning: helo_name: line 1: leading/trailing whitespace removed from " x.example"\n'
        'error: log_level: line 2: expected one of debug, info, warning, error, got "loud"\n'
    )


def test_cli_without_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from relayd.config import loader

    monkeypatch.setattr(loader, "DEFAULT_CONFIG_PATH", tmp_path / "absent.yaml")
    assert cli.main(["check-config"]) == 2
    assert capsys.readouterr().err.startswith("error: no configuration file found: pass -c FILE")


def test_cli_hash_password(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from relayd.passwords import verify_password

    monkeypatch.setattr("sys.stdin", io.StringIO("my password\n"))
    assert cli.main(["hash-password"]) == 0
    encoded = capsys.readouterr().out.strip()
    assert verify_password("my password", encoded)
    monkeypatch.setattr("sys.stdin", io.StringIO("\n"))
    assert cli.main(["hash-password"]) == 1


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert cli.main(["no-such-command"]) == 2
    capsys.readouterr()


def test_a_record_that_is_not_a_mapping_is_reported_once(tmp_path: Path) -> None:
    text = """
    listen:
      - 127.0.0.1:2525
    tenants:
      t:
        provider: gmail
        accounts:
          - a@example.com
      u: gmail
    """
    assert problems(tmp_path, text) == [
        'listen[0]: line 2: expected a mapping, got "127.0.0.1:2525"',
        'tenants.t.accounts[0]: line 7: expected a mapping, got "a@example.com"',
        'tenants.u: line 8: expected a mapping, got "gmail"',
    ]


# -- helo_name --------------------------------------------------------------------------------


def sends_out(tmp_path: Path) -> str:
    """A config whose mail leaves the host, with nothing else to warn about."""
    secret = tmp_path / "password"
    secret.write_text("app password\n")
    secret.chmod(0o600)
    return (
        "tenants:\n  acme:\n    provider: custom\n"
        "    smtp: {host: smtp.acme.example, port: 587, tls: starttls}\n"
        f"    accounts: [{{address: app@acme.example, password: {{file: {secret}}}}}]\n"
    )


@pytest.mark.parametrize(
    ("host_name", "problem"),
    [
        ("localhost", "a loopback name"),
        ("localhost.localdomain", "a loopback name"),
        ("vm", "not a fully qualified domain name"),
        ("app01.acme.example", None),
    ],
)
def test_a_default_helo_name_providers_may_refuse_is_warned_about(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    host_name: str,
    problem: str | None,
) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda name="": host_name)
    path = write(tmp_path, sends_out(tmp_path))
    assert cli.main(["check-config", "-c", str(path)]) == 0
    err = capsys.readouterr().err
    if problem is None:
        assert "helo_name" not in err
    else:
        assert (
            f"warning: helo_name: not set, and this host's name {host_name!r} is {problem}: "
            "providers may refuse it in EHLO; set helo_name to this host's public name"
        ) in err


def test_a_configured_loopback_helo_name_is_warned_about_and_capture_needs_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load(tmp_path, "helo_name: localhost\n" + sends_out(tmp_path))
    assert config.warnings == (
        "helo_name: line 1: 'localhost' is a loopback name; set helo_name to this host's "
        "public name (a name that resolves to it)",
    )
    # No mail leaves a host whose tenants all capture (the demo): nothing to warn about.
    monkeypatch.setattr(socket, "getfqdn", lambda name="": "localhost")
    assert load_config(LOCAL).warnings == ()


# -- fleet: tokens, health and budgets shared through PostgreSQL ------------------------------


def test_fleet_reads_the_database_url_as_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLEET_DSN", "postgresql://relayd:pw-x@db.example:5432/relayd")
    monkeypatch.setenv("TOKEN_KEY", "k" * 40)
    config = load(
        tmp_path,
        """
        tokens: {key: {env: TOKEN_KEY}}
        fleet:
          database: {env: FLEET_DSN}
          name: app07
          lease_time: 10s
        """,
    )
    fleet = config.fleet
    assert fleet is not None
    assert (fleet.name, fleet.lease_time, fleet.where) == ("app07", 10.0, "fleet: line 2")
    assert fleet.database.reveal().endswith("@db.example:5432/relayd")
    assert "pw-x" not in repr(fleet)
    assert "postgresql://relayd:pw-x@db.example:5432/relayd" in config.secret_values()
    assert load(tmp_path, "log_level: info\n").fleet is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "tokens: {key: {env: TOKEN_KEY}}\nfleet: {name: a}\n",
            "fleet.database: line 2: missing; expected a secret value holding a PostgreSQL URL",
        ),
        (
            "tokens: {key: {env: TOKEN_KEY}}\nfleet:\n  database: {env: BAD_DSN}\n",
            "fleet.database: line 3: expected a PostgreSQL URL "
            "(postgresql://user:password@host:5432/dbname) (<secret from env:BAD_DSN>)",
        ),
        (
            "fleet:\n  database: {env: FLEET_DSN}\n",
            "fleet: line 1: fleet mode needs tokens.key, the same secret on every host: each "
            "host opens the token rows the others wrote",
        ),
        (
            "tokens: {key: {env: TOKEN_KEY}}\nfleet:\n  database: {env: FLEET_DSN}\n"
            "  lease_time: 1s\n",
            "fleet.lease_time: line 4: at least 3s: leases are renewed every third of it",
        ),
        (
            "tokens: {key: {env: TOKEN_KEY}}\nfleet:\n  database: {env: FLEET_DSN}\n  lease: 10s\n",
            "fleet.lease: line 4: unknown key; allowed keys: database, name, lease_time",
        ),
    ],
)
def test_fleet_problems_name_path_and_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    monkeypatch.setenv("FLEET_DSN", "postgresql://relayd:pw@db.example/relayd")
    monkeypatch.setenv("BAD_DSN", "mysql://relayd:secret-pw@db")
    monkeypatch.setenv("TOKEN_KEY", "k" * 40)
    found = problems(tmp_path, text)
    assert expected in found
    assert not any("secret-pw" in p for p in found)
