"""Pure parts of the web connect page: PKCE, the sign-in checks (state, verifier, ID token,
identity), link lifecycle, CSRF tokens and origins, the rate limit."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from factories import make_account

from relayd.config.model import OAuthConfig
from relayd.oauth.codeflow import CodeFlow, authorization_url, code_flow_for
from relayd.oauth.identity import id_token_claims
from relayd.oauth.pkce import challenge_of, is_verifier, new_verifier
from relayd.web.csrf import new_csrf_token, origin_allowed, token_matches
from relayd.web.links import Link, LinkState, LinkStore, link_state
from relayd.web.ratelimit import RateLimit
from relayd.web.signin import (
    SIGN_IN_SECONDS,
    CallbackRefusal,
    IdentityProblem,
    PendingSignIn,
    begin_sign_in,
    check_callback,
    check_identity,
)

ALICE = make_account("alice@example.test", password=None, username="alice@example.test")
NOW = 1_800_000_000.0


# -- PKCE (RFC 7636) ---------------------------------------------------------------------------


def test_pkce_s256_matches_the_rfc_example() -> None:
    # RFC 7636 Appendix B.
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert challenge_of(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    fresh = new_verifier()
    assert is_verifier(fresh) and len(fresh) == 43
    for bad in ("short", "x" * 129, "a" * 42 + "!", None, 42):
        assert not is_verifier(bad)


# -- the provider's answer -------------------------------------------------------------------


PENDING = begin_sign_in(ALICE, NOW)


def pending(**changes: Any) -> PendingSignIn:
    return dataclasses.replace(PENDING, **changes)


@pytest.mark.parametrize(
    ("state", "query", "now", "expected"),
    [
        (PENDING, {"state": PENDING.state, "code": "c0de"}, NOW + 5, None),
        (None, {"state": PENDING.state, "code": "c0de"}, NOW, CallbackRefusal.NOTHING_PENDING),
        (PENDING, {"state": "forged", "code": "c0de"}, NOW, CallbackRefusal.STATE_MISMATCH),
        (PENDING, {"code": "c0de"}, NOW, CallbackRefusal.STATE_MISMATCH),
        (
            PENDING,
            {"state": PENDING.state, "code": "c0de"},
            NOW + SIGN_IN_SECONDS + 1,
            CallbackRefusal.EXPIRED,
        ),
        (
            pending(verifier=""),
            {"state": PENDING.state, "code": "c0de"},
            NOW,
            CallbackRefusal.NO_VERIFIER,
        ),
        (
            PENDING,
            {"state": PENDING.state, "error": "access_denied"},
            NOW,
            CallbackRefusal.DENIED,
        ),
        (PENDING, {"state": PENDING.state}, NOW, CallbackRefusal.NO_CODE),
    ],
)
def test_callback_checks(
    state: PendingSignIn | None,
    query: dict[str, str],
    now: float,
    expected: CallbackRefusal | None,
) -> None:
    verdict = check_callback(state, query, now)
    assert verdict.refusal is expected
    assert verdict.ok is (expected is None)
    if expected is None:
        assert verdict.code == "c0de"


def claims(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "aud": "client-1",
        "exp": NOW + 3600,
        "nonce": PENDING.nonce,
        "preferred_username": "Alice@Example.test",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize(
    ("found", "who", "expected"),
    [
        (claims(), "alice@example.test", None),
        (claims(preferred_username=None, upn="alice@example.test"), "alice@example.test", None),
        (claims(preferred_username=None, email="alice@example.test"), "alice@example.test", None),
        # Microsoft: a UPN that is not the mailbox address, the address in email.
        (
            claims(preferred_username="a.smith@corp.test", email="alice@example.test"),
            "alice@example.test",
            None,
        ),
        (claims(aud=["other", "client-1"]), "alice@example.test", None),
        (claims(preferred_username="mallory@example.test"), "mallory@example.test", "OTHER"),
        (None, None, "NO_ID_TOKEN"),
        (claims(aud="other"), "alice@example.test", "WRONG_AUDIENCE"),
        (claims(exp=NOW - 1000), "alice@example.test", "EXPIRED"),
        (claims(nonce="replayed"), "alice@example.test", "NONCE_MISMATCH"),
        (claims(nonce=None), "alice@example.test", "NONCE_MISMATCH"),
        (
            claims(preferred_username=None, email="alice@example.test", email_verified=False),
            "alice@example.test",
            "UNVERIFIED_EMAIL",
        ),
        (claims(preferred_username="not-an-address"), None, "NO_IDENTITY"),
    ],
)
def test_identity_checks(
    found: dict[str, Any] | None, who: str | None, expected: str | None
) -> None:
    problems: dict[str | None, IdentityProblem | None] = {
        None: None,
        "OTHER": IdentityProblem.OTHER_IDENTITY,
        **{p.name: p for p in IdentityProblem},
    }
    identity = check_identity(found, ALICE, client_id="client-1", nonce=PENDING.nonce, now=NOW)
    assert (identity.who, identity.problem) == (who, problems[expected])


def test_the_login_name_counts_as_the_identity() -> None:
    delegate = dataclasses.replace(ALICE, username="delegate@example.test")
    identity = check_identity(
        claims(preferred_username="delegate@example.test"),
        delegate,
        client_id="client-1",
        nonce=PENDING.nonce,
        now=NOW,
    )
    assert identity.problem is None


# -- the authorization request and the ID token ----------------------------------------------


def test_authorization_url_carries_state_challenge_and_nonce() -> None:
    flow = CodeFlow("Microsoft", "https://login.test/t/oauth2/v2.0/authorize", "", "cid", ("s",))
    url = authorization_url(
        flow,
        redirect_uri="https://relay.test/connect/callback",
        state="st",
        verifier=PENDING.verifier,
        nonce="nn",
        login_hint="alice@example.test",
    )
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert query == {
        "response_type": "code",
        "client_id": "cid",
        "redirect_uri": "https://relay.test/connect/callback",
        "scope": "s",
        "state": "st",
        "code_challenge": challenge_of(PENDING.verifier),
        "code_challenge_method": "S256",
        "nonce": "nn",
        "login_hint": "alice@example.test",
    }
    assert PENDING.verifier not in url


def test_code_flows_of_the_providers() -> None:
    ms = dataclasses.replace(
        ALICE,
        provider="microsoft365",
        oauth=OAuthConfig(flow="delegated", client_id="cid", tenant_id="contoso.test"),
    )
    flow = code_flow_for(ms)
    assert isinstance(flow, CodeFlow) and flow.provider == "Microsoft"
    assert flow.token_url == "https://login.microsoftonline.com/contoso.test/oauth2/v2.0/token"
    assert {"openid", "offline_access", "https://outlook.office.com/SMTP.Send"} <= set(flow.scopes)
    google = dataclasses.replace(
        ALICE, provider="gmail", oauth=OAuthConfig(flow="delegated", client_id="g")
    )
    flow = code_flow_for(google)
    assert isinstance(flow, CodeFlow) and ("access_type", "offline") in flow.extra
    app_only = dataclasses.replace(ms, oauth=OAuthConfig(flow="client_credentials"))
    assert isinstance(code_flow_for(app_only), str)


def test_id_token_claims() -> None:
    def part(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")

    token = f"{part({'alg': 'RS256'})}.{part({'email': 'a@b.test'})}.sig"
    assert id_token_claims(token) == {"email": "a@b.test"}
    for bad in (None, "", "a.b", "a.!!!.c", f"x.{part({'x': 1})[:-2]}.y"):
        assert id_token_claims(bad) is None


# -- links -------------------------------------------------------------------------------------


def test_link_lifecycle(tmp_path: Path) -> None:
    store = LinkStore(tmp_path)
    token = store.create("Alice@Example.test", 3600, now=NOW)
    assert len(token) == 43
    link = store.find(token)
    assert link is not None and link.account == "alice@example.test"
    assert link_state(link, NOW + 10) is LinkState.VALID
    assert link_state(link, NOW + 3600) is LinkState.EXPIRED
    # Stored hashed: the token is nowhere in the state directory.
    (path,) = (tmp_path / "links").iterdir()
    assert path.name == hashlib.sha256(token.encode()).hexdigest() + ".json"
    assert token not in path.read_text()
    assert path.stat().st_mode & 0o777 == 0o600
    assert store.use(link) and not store.use(link)  # single use, even racing
    used = store.find(token)
    assert used is not None and link_state(used, NOW) is LinkState.USED
    assert store.find("x" * 43) is None and store.find("../../etc/passwd") is None
    assert store.sweep(NOW + 8 * 86400) == 1 and store.find(token) is None


@pytest.mark.parametrize(
    ("link", "now", "state"),
    [
        (Link("d", "a@b", NOW, NOW + 60), NOW, LinkState.VALID),
        (Link("d", "a@b", NOW, NOW + 60), NOW + 60, LinkState.EXPIRED),
        (Link("d", "a@b", NOW, NOW + 60, used_at=NOW + 1), NOW + 2, LinkState.USED),
        (Link("d", "a@b", NOW, NOW + 60, used_at=NOW + 1), NOW + 99, LinkState.USED),
    ],
)
def test_link_states(link: Link, now: float, state: LinkState) -> None:
    assert link_state(link, now) is state


# -- CSRF and rate limits ----------------------------------------------------------------------


def test_csrf_tokens() -> None:
    token = new_csrf_token()
    assert token_matches(token, token)
    for submitted in (None, "", token[:-1], token + "x", 42):
        assert not token_matches(token, submitted)
    assert not token_matches(None, token) and not token_matches("", "")


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),
        ("https://relay.test", True),
        ("https://relay.test:443", True),
        ("http://127.0.0.1:8425", True),
        ("null", True),
        ("https://evil.test", False),
        ("http://relay.test", False),
    ],
)
def test_origins(origin: str | None, allowed: bool) -> None:
    assert origin_allowed(origin, "https://relay.test/relayd", "http://127.0.0.1:8425") is allowed


def test_rate_limit_window() -> None:
    limit = RateLimit(3, 60)
    assert [limit.allow("a", NOW + i) for i in range(4)] == [True, True, True, False]
    assert limit.allow("b", NOW)  # per client
    assert limit.retry_after("a", NOW + 10) == pytest.approx(50)
    assert limit.allow("a", NOW + 60)  # the first one left the window
    small = RateLimit(1, 60, max_keys=2)
    assert small.allow("x", NOW) and small.allow("y", NOW) and small.allow("z", NOW + 61)


# -- relayd connect ----------------------------------------------------------------------------


def test_relayd_connect_prints_a_link(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relayd import cli

    config = tmp_path / "relayd.yaml"
    config.write_text(
        f"state_directory: {tmp_path}/state\n"
        "web: {address: 127.0.0.1:8425, public_url: https://relay.test}\n"
        "tenants:\n  t:\n    provider: gmail\n    accounts:\n"
        "      - {address: a@example.test, password: {connect: true}}\n"
        "      - {address: b@example.test, password: literal-password}\n"
    )
    assert cli.main(["-c", str(config), "connect", "A@example.test", "--expires", "2h"]) == 0
    out, err = capsys.readouterr()
    link = out.strip()
    assert link.startswith("https://relay.test/connect/") and "works once" in err
    found = LinkStore(tmp_path / "state").find(link.rsplit("/", 1)[1])
    assert found is not None and found.account == "a@example.test"
    assert 7100 < found.expires_at - found.created_at <= 7200
    assert cli.main(["-c", str(config), "connect", "b@example.test"]) == 1
    assert "nothing to connect" in capsys.readouterr().err
    assert cli.main(["-c", str(config), "connect", "nobody@example.test"]) == 1
    assert cli.main(["-c", str(config), "connect", "a@example.test", "--expires", "soon"]) == 2
    assert cli.main(["-c", str(config), "connect", "a@example.test", "--expires", "90d"]) == 2
