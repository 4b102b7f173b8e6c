"""SPEC "Routing and who may send as whom": identification, rewriting, may_send_as, routes."""

from __future__ import annotations

from dataclasses import replace

import pytest
from factories import (
    make_account,
    make_client,
    make_config,
    make_domain_template,
    make_tenant,
    pattern,
)

from relayd.config.model import ANONYMOUS, Config
from relayd.core.routing import (
    Refusal,
    RouteDecision,
    UnixUser,
    check_address_syntax,
    decide_route,
    find_account,
    identify_client,
    rewrite_sender,
)

HOSTNAME = "app01.acme.example"
LOCAL = frozenset({"localhost", "localhost.localdomain", HOSTNAME})


def _acme_config(**overrides: object) -> Config:
    clients = [
        make_client(ANONYMOUS, may_send_as=["noreply@acme.example"]),
        make_client(
            "crm",
            password_hash="$scrypt$x",
            may_send_as=["sales@acme.example", "support@acme.example"],
        ),
        make_client("webapp", unix_users=["www-data", "php"], may_send_as=["*@acme.example"]),
        make_client("batch", unix_users=["1500"], may_send_as=["*@acme.example"]),
        make_client("scanner", networks=["192.168.10.0/24"], may_send_as=["scanner@acme.example"]),
        make_client("v6lan", networks=["fd00:10::/64"], may_send_as=["scanner@acme.example"]),
        make_client("front", may_send_as=["frontdesk@acme.example"]),
        make_client("subs", may_send_as=["*@*.corp.example"]),
        make_client("any", may_send_as=["*"]),
    ]
    acme = make_tenant(
        "acme",
        provider="microsoft365",
        domains=["acme.example"],
        accounts=[
            make_account("alice@acme.example", provider="microsoft365"),
            make_account(
                "scanner@acme.example", provider="microsoft365", aliases=["FrontDesk@acme.example"]
            ),
            make_account("sales@acme.example", provider="microsoft365"),
            make_account("support@acme.example", provider="microsoft365"),
            make_account("noreply@acme.example", provider="microsoft365"),
            make_account("alerts@acme.example", provider="microsoft365"),
        ],
    )
    hosting = make_tenant("hosting", accounts=[make_account("info@host.example", tenant="hosting")])
    corp = make_tenant("corp", provider="capture", domains=["*.corp.example"])
    kwargs: dict[str, object] = {
        "clients": clients,
        "tenants": [acme, hosting, corp],
        "rewrite_senders": {"root": "alerts@acme.example", "*@localhost": "noreply@acme.example"},
    }
    kwargs.update(overrides)
    return make_config(**kwargs)  # type: ignore[arg-type]


@pytest.fixture
def cfg() -> Config:
    return _acme_config()


# -- rule 1: who is the client --------------------------------------------------------------


WWW_DATA = UnixUser(33, "www-data")
PHP = UnixUser(1001, "php")
NOBODY = UnixUser(65534, "nobody")


@pytest.mark.parametrize(
    ("login", "unix_user", "peer_ip", "expected"),
    [
        # AUTH login beats everything, even a Unix user and a network that name other clients.
        ("crm", WWW_DATA, "192.168.10.5", "crm"),
        ("webapp", None, "192.168.10.5", "webapp"),
        # Then the Unix user, even from a configured network.
        (None, WWW_DATA, "192.168.10.5", "webapp"),
        (None, PHP, None, "webapp"),
        # A uid in unix_users names its user, with or without a passwd entry.
        (None, UnixUser(1500, "batchjobs"), None, "batch"),
        (None, UnixUser(1500, None), None, "batch"),
        # An unknown Unix user falls through to networks, then to anonymous.
        (None, NOBODY, "192.168.10.5", "scanner"),
        (None, NOBODY, None, ANONYMOUS),
        (None, UnixUser(1501, None), None, ANONYMOUS),
        (None, None, "192.168.10.5", "scanner"),
        (None, None, "192.168.10.255", "scanner"),
        (None, None, "192.168.11.5", ANONYMOUS),
        (None, None, "127.0.0.1", ANONYMOUS),
        (None, None, "fd00:10::5", "v6lan"),
        (None, None, "fd00:11::5", ANONYMOUS),
        (None, None, "not-an-ip", ANONYMOUS),
        (None, None, None, ANONYMOUS),
    ],
)
def test_identify_client_order(
    cfg: Config,
    login: str | None,
    unix_user: UnixUser | None,
    peer_ip: str | None,
    expected: str,
) -> None:
    client = identify_client(cfg, login=login, unix_user=unix_user, peer_ip=peer_ip)
    assert client.name == expected
    assert client is cfg.clients[expected]


def test_a_unix_user_reads_as_its_name_or_its_uid() -> None:
    assert (str(WWW_DATA), str(UnixUser(1500, None))) == ("www-data", "uid 1500")


# -- may_send_as patterns ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "address", "expected"),
    [
        ("sales@acme.example", "sales@acme.example", True),
        ("sales@acme.example", "SALES@Acme.Example", True),
        ("Sales@ACME.example", "sales@acme.example", True),
        ("sales@acme.example", "sales2@acme.example", False),
        ("sales@acme.example", "sales@acme.example.evil", False),
        ("sales@acme.example", "sales@sub.acme.example", False),
        ("*@acme.example", "anyone@acme.example", True),
        ("*@acme.example", "Anyone@ACME.EXAMPLE", True),
        ("*@acme.example", "anyone@sub.acme.example", False),
        ("*@acme.example", "anyone@evilacme.example", False),
        ("*@acme.example", "anyone@acme.example.evil", False),
        ("*@acme.example", "root", False),
        ("*@*.acme.example", "x@eu.acme.example", True),
        ("*@*.acme.example", "x@a.b.acme.example", True),
        ("*@*.acme.example", "x@acme.example", False),
        ("*@*.acme.example", "x@evilacme.example", False),
        ("*@*.acme.example", "x@acme.example.evil", False),
        ("*", "anyone@anywhere.example", True),
        ("*", "ANYONE@ANYWHERE.EXAMPLE", True),
    ],
)
def test_may_send_as_patterns(text: str, address: str, expected: bool) -> None:
    client = make_client("c", may_send_as=[text])
    assert client.may_send_as_address(address) is expected
    assert pattern(text).matches(address) is expected


def test_client_without_may_send_as_may_send_as_nobody() -> None:
    client = make_client(ANONYMOUS)
    assert not client.may_send_as_address("noreply@acme.example")
    cfg = _acme_config(clients=[client])
    refusal = decide_route(cfg, client, "noreply@acme.example", LOCAL)
    assert isinstance(refusal, Refusal)
    assert refusal.reply.startswith("550 5.7.1 ")


@pytest.mark.parametrize(
    ("client", "sender", "account"),
    [
        ("crm", "sales@acme.example", "sales@acme.example"),
        ("crm", "Support@ACME.example", "support@acme.example"),
        ("webapp", "alice@acme.example", "alice@acme.example"),
        (ANONYMOUS, "noreply@acme.example", "noreply@acme.example"),
        # An alias routes to the account that owns it; the sender stays the alias.
        ("front", "frontdesk@acme.example", "scanner@acme.example"),
        ("any", "info@host.example", "info@host.example"),
    ],
)
def test_allowed_sender_is_routed(cfg: Config, client: str, sender: str, account: str) -> None:
    decision = decide_route(cfg, cfg.clients[client], sender, LOCAL)
    assert isinstance(decision, RouteDecision)
    assert decision.sender == sender
    assert decision.account.address == account


@pytest.mark.parametrize(
    ("client", "sender"),
    [
        ("crm", "alice@acme.example"),  # routable, but not this client's
        ("crm", "sales@acme.example.evil"),
        ("scanner", "frontdesk@acme.example"),  # the account's alias is not the client's
        ("webapp", "info@host.example"),
        ("webapp", "x@sub.acme.example"),
        (ANONYMOUS, "alice@acme.example"),
        ("subs", "x@corp.example"),
    ],
)
def test_sender_not_in_may_send_as_is_refused(cfg: Config, client: str, sender: str) -> None:
    refusal = decide_route(cfg, cfg.clients[client], sender, LOCAL)
    assert isinstance(refusal, Refusal)
    assert refusal.reply.startswith("550 5.7.1 ")


# -- rule 2: rewrite_senders -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        ("root", "alerts@acme.example"),
        ("ROOT", "alerts@acme.example"),
        ("root@localhost", "alerts@acme.example"),
        ("root@LOCALHOST", "alerts@acme.example"),
        ("root@localhost.localdomain", "alerts@acme.example"),
        (f"root@{HOSTNAME}", "alerts@acme.example"),
        (f"Root@{HOSTNAME.upper()}", "alerts@acme.example"),
        ("root@example.com", "root@example.com"),
        ("root@acme.example", "root@acme.example"),
        ("rooter", "rooter"),
        ("xroot@localhost", "xroot@localhost"),
        ("root@", "root@"),
        ("root@localhost@evil.example", "root@localhost@evil.example"),
        ("alice@acme.example", "alice@acme.example"),
    ],
)
def test_rewrite_bare_local_part(sender: str, expected: str) -> None:
    cfg = make_config(rewrite_senders={"root": "alerts@acme.example"})
    assert rewrite_sender(cfg, sender, LOCAL) == expected


@pytest.mark.parametrize(
    ("sender", "expected"),
    [
        # First matching rule wins: "root" is listed before "*@localhost".
        ("root", "alerts@acme.example"),
        ("root@localhost", "alerts@acme.example"),
        ("www-data@localhost", "noreply@acme.example"),
        ("WWW-DATA@LOCALHOST", "noreply@acme.example"),
        ("www-data", "noreply@acme.example"),  # a bare sender is user@localhost
        (f"www-data@{HOSTNAME}", f"www-data@{HOSTNAME}"),
        ("www-data@example.com", "www-data@example.com"),
    ],
)
def test_rewrite_rules_in_order(cfg: Config, sender: str, expected: str) -> None:
    assert rewrite_sender(cfg, sender, LOCAL) == expected


def test_rewrite_star_pattern_rewrites_every_sender() -> None:
    cfg = make_config(rewrite_senders={"*": "noreply@acme.example"})
    assert rewrite_sender(cfg, "someone@else.example", LOCAL) == "noreply@acme.example"


def test_rewritten_sender_is_what_may_send_as_checks(cfg: Config) -> None:
    # webapp may send as *@acme.example: "root" is not an address of acme, its rewrite is.
    decision = decide_route(cfg, cfg.clients["webapp"], "root", LOCAL)
    assert isinstance(decision, RouteDecision)
    assert decision.sender == "alerts@acme.example"
    assert decision.account.address == "alerts@acme.example"
    # crm may not send as the rewritten address: refused, naming the rewritten address.
    refusal = decide_route(cfg, cfg.clients["crm"], f"root@{HOSTNAME}", LOCAL)
    assert isinstance(refusal, Refusal)
    assert refusal.reply.startswith("550 5.7.1 ")
    assert "alerts@acme.example" in refusal.reply


@pytest.mark.parametrize("sender", ["www-data2", "cron"])
def test_bare_sender_without_rule_is_refused(sender: str) -> None:
    cfg = _acme_config(rewrite_senders={})
    refusal = decide_route(cfg, cfg.clients["any"], sender, LOCAL)
    assert isinstance(refusal, Refusal)
    assert refusal.reply.startswith("550 5.7.1 ")


# -- rule 3: the null sender, rule 4: sender not configured -------------------------------------


@pytest.mark.parametrize("client", [ANONYMOUS, "crm", "webapp", "any"])
def test_null_sender_is_refused(cfg: Config, client: str) -> None:
    refusal = decide_route(cfg, cfg.clients[client], "", LOCAL)
    assert isinstance(refusal, Refusal)
    assert refusal.reply.startswith("550 5.7.1 ")


@pytest.mark.parametrize(
    "sender", ["nobody@unknown.example", "x@host.example", "x@corp.example", "x@acme.example.org"]
)
def test_sender_not_configured(cfg: Config, sender: str) -> None:
    assert find_account(cfg, sender) is None
    refusal = decide_route(cfg, cfg.clients["any"], sender, LOCAL)
    assert isinstance(refusal, Refusal)
    assert refusal.reply.startswith("550 5.7.1 ")
    assert "not configured" in refusal.reply


# -- rule 4: the route ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sender", "address", "tenant"),
    [
        ("alice@acme.example", "alice@acme.example", "acme"),
        ("ALICE@Acme.Example", "alice@acme.example", "acme"),
        ("frontdesk@acme.example", "scanner@acme.example", "acme"),
        ("FrontDesk@ACME.EXAMPLE", "scanner@acme.example", "acme"),
        ("info@host.example", "info@host.example", "hosting"),
    ],
)
def test_find_account_by_address_or_alias(
    cfg: Config, sender: str, address: str, tenant: str
) -> None:
    account = find_account(cfg, sender)
    assert account is not None
    assert account.address == address
    assert account.tenant == tenant


@pytest.mark.parametrize(
    ("sender", "tenant", "provider"),
    [
        ("billing@acme.example", "acme", "microsoft365"),
        ("Billing@ACME.example", "acme", "microsoft365"),
        ("x@eu.corp.example", "corp", "capture"),
        ("x@a.b.corp.example", "corp", "capture"),
    ],
)
def test_domain_routing_substitutes_the_sender(
    cfg: Config, sender: str, tenant: str, provider: str
) -> None:
    template = next(t.domain_account for t in cfg.tenants if t.name == tenant)
    assert template is not None
    account = find_account(cfg, sender)
    assert account is not None
    assert account.address == sender.lower()
    assert account.username == sender.lower()  # app-only flows log in as the sender
    assert account.tenant == tenant
    assert account.provider == provider
    assert account.oauth == template.oauth
    assert account.limits == template.limits
    # The template is shared by every sender of the domain: it must stay untouched.
    assert template.address == ""
    assert template.username == ""


def test_domain_routing_through_decide_route(cfg: Config) -> None:
    decision = decide_route(cfg, cfg.clients["webapp"], "billing@acme.example", LOCAL)
    assert isinstance(decision, RouteDecision)
    assert decision.account.address == "billing@acme.example"
    assert decision.account.tenant == "acme"
    decision = decide_route(cfg, cfg.clients["subs"], "ops@eu.corp.example", LOCAL)
    assert isinstance(decision, RouteDecision)
    assert decision.account.address == "ops@eu.corp.example"
    assert decision.account.is_capture


def test_domain_template_keeps_an_explicit_username() -> None:
    template = replace(make_domain_template("acme"), username="relay-app@acme.example")
    cfg = make_config(
        tenants=[make_tenant("acme", domains=["acme.example"], domain_account=template)]
    )
    account = find_account(cfg, "billing@acme.example")
    assert account is not None
    assert account.address == "billing@acme.example"
    assert account.username == "relay-app@acme.example"


def test_an_account_wins_over_an_earlier_tenants_domains() -> None:
    catch_all = make_tenant("staging", provider="capture", domains=["*"])
    acme = make_tenant("acme", accounts=[make_account("alice@acme.example")])
    cfg = make_config(tenants=[catch_all, acme])
    account = find_account(cfg, "alice@acme.example")
    assert account is not None
    assert account.tenant == "acme"
    other = find_account(cfg, "someone@else.example")
    assert other is not None
    assert other.tenant == "staging"
    assert other.address == "someone@else.example"


def test_tenant_without_domain_template_does_not_route_its_domains() -> None:
    tenant = make_tenant("acme", accounts=[make_account("alice@acme.example")])
    tenant = replace(tenant, domains=(pattern("*@acme.example"),))
    cfg = make_config(tenants=[tenant])
    assert tenant.domain_account is None
    assert find_account(cfg, "bob@acme.example") is None


# -- open relay: the address forms of nmap's smtp-open-relay --------------------------------------

IP = "192.0.2.1"
DOM = "nmap.scanme.org"
SRV = HOSTNAME  # nmap uses the name the server announces

# The RCPT TO forms of smtp-open-relay's tests 5-16, and the IP literal of its MAIL FROM.
ODD_FORMS = [
    pytest.param(f"relaytest%{DOM}@[{IP}]", id="percent-hack-ip-literal"),
    pytest.param(f"relaytest%{DOM}@{SRV}", id="percent-hack-hostname"),
    pytest.param(f'"relaytest@{DOM}"', id="quoted-address"),
    pytest.param(f'"relaytest%{DOM}"', id="quoted-percent"),
    pytest.param(f"relaytest@{DOM}@[{IP}]", id="two-at-ip-literal"),
    pytest.param(f'"relaytest@{DOM}"@[{IP}]', id="quoted-at-ip-literal"),
    pytest.param(f"relaytest@{DOM}@{SRV}", id="two-at-hostname"),
    pytest.param(f"@[{IP}]:relaytest@{DOM}", id="source-route-ip-literal"),
    pytest.param(f"@{SRV}:relaytest@{DOM}", id="source-route-hostname"),
    pytest.param(f"{DOM}!relaytest", id="bang-path"),
    pytest.param(f"{DOM}!relaytest@[{IP}]", id="bang-path-ip-literal"),
    pytest.param(f"{DOM}!relaytest@{SRV}", id="bang-path-hostname"),
    pytest.param(f"antispam@[{IP}]", id="ip-literal-sender"),
    pytest.param(f"relaytest@[{IP}]", id="ip-literal"),
    pytest.param("relaytest@[IPv6:2001:db8::1]", id="ipv6-literal"),
    pytest.param('"relaytest"@acme.example', id="quoted-local-part-routed-domain"),
    pytest.param(f"@[{IP}],@{SRV}:alice@acme.example", id="source-route-list"),
    pytest.param("alice%acme.example@acme.example", id="percent-hack-routed-domain"),
]


@pytest.mark.parametrize("address", ODD_FORMS)
def test_check_address_syntax_refuses_relay_forms(address: str) -> None:
    refusal = check_address_syntax(address)
    assert isinstance(refusal, Refusal)
    assert refusal.reply[:1] == "5"
    assert refusal.reply.split()[1].startswith("5.")


@pytest.mark.parametrize(
    "address", ["alice@acme.example", "first.last+tag@sub.acme.example", "o'brien@acme.example"]
)
def test_check_address_syntax_accepts_plain_addresses(address: str) -> None:
    assert check_address_syntax(address) is None


@pytest.mark.parametrize("address", ODD_FORMS)
def test_decide_route_refuses_relay_forms_even_for_a_permissive_config(address: str) -> None:
    # The most permissive routing there is: anyone may send as anything, a catch-all tenant.
    cfg = make_config(
        clients=[make_client(ANONYMOUS, may_send_as=["*"])],
        tenants=[make_tenant("staging", provider="capture", domains=["*"])],
        rewrite_senders={"root": "alerts@acme.example"},
    )
    result = decide_route(cfg, cfg.clients[ANONYMOUS], address, LOCAL)
    assert isinstance(result, Refusal), result
    assert result.reply[:1] == "5"


# smtp-open-relay's 16 (MAIL FROM, RCPT TO) pairs; from=antispam, to=relaytest.
_NMAP_RCPT_FORMS = [
    f"relaytest@{DOM}",
    f"relaytest%{DOM}@[{IP}]",
    f"relaytest%{DOM}@{SRV}",
    f'"relaytest@{DOM}"',
    f'"relaytest%{DOM}"',
    f"relaytest@{DOM}@[{IP}]",
    f'"relaytest@{DOM}"@[{IP}]',
    f"relaytest@{DOM}@{SRV}",
    f"@[{IP}]:relaytest@{DOM}",
    f"@{SRV}:relaytest@{DOM}",
    f"{DOM}!relaytest",
    f"{DOM}!relaytest@[{IP}]",
    f"{DOM}!relaytest@{SRV}",
]
NMAP_TESTS = [
    ("", f"relaytest@{DOM}"),
    (f"antispam@{DOM}", f"relaytest@{DOM}"),
    (f"antispam@{SRV}", f"relaytest@{DOM}"),
    *[(f"antispam@[{IP}]", to) for to in _NMAP_RCPT_FORMS],
]


def test_nmap_has_sixteen_tests() -> None:
    assert len(NMAP_TESTS) == 16
    assert len(set(NMAP_TESTS)) == 16


@pytest.mark.parametrize(("sender", "recipient"), NMAP_TESTS)
def test_nmap_open_relay_probe_is_refused_at_mail_from(
    cfg: Config, sender: str, recipient: str
) -> None:
    # From an unauthenticated peer (anonymous may send as noreply@acme.example only).
    client = identify_client(cfg, peer_ip="203.0.113.9")
    assert client.name == ANONYMOUS
    result = decide_route(cfg, client, sender, LOCAL)
    assert isinstance(result, Refusal)
    assert result.reply.startswith("55")
