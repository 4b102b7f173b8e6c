"""Pure token rules, XOAUTH2 encoding, and the registry's refresh discipline (with a
scripted provider standing in for msal/google-auth; the real ones run in the integration
tests against the suite's token server)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest
from factories import make_account

from relayd.config.model import AccountConfig, OAuthConfig, Secret
from relayd.core.health import credentials_fingerprint
from relayd.core.outcome import Phase, Reply, Verdict, classify_reply
from relayd.oauth import registry as registry_module
from relayd.oauth.registry import TokenSources
from relayd.oauth.store import StoredTokens, TokenStore
from relayd.oauth.tokens import (
    REFRESH_MARGIN,
    AccessToken,
    ConsentRequired,
    Grant,
    TokenEndpointUnavailable,
    grant_error,
    needs_refresh,
)
from relayd.oauth.xoauth2 import error_challenge_status, xoauth2_response

NOW = 1_800_000_000.0


# -- pure rules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("remaining", "refresh"),
    [
        (None, True),
        (-5, True),
        (0, True),
        (REFRESH_MARGIN - 1, True),
        (REFRESH_MARGIN, False),
        (3600, False),
    ],
)
def test_refresh_when_less_than_ten_minutes_remain(remaining: float | None, refresh: bool) -> None:
    token = None if remaining is None else AccessToken("t", NOW + remaining)
    assert needs_refresh(token, NOW) is refresh


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ("invalid_grant", ConsentRequired),
        ("invalid_client", ConsentRequired),
        ("unauthorized_client", ConsentRequired),
        ("temporarily_unavailable", TokenEndpointUnavailable),
        ("server_error", TokenEndpointUnavailable),
        (None, TokenEndpointUnavailable),
    ],
)
def test_only_refusals_of_the_grant_need_a_human(error: str | None, kind: type) -> None:
    problem = grant_error(error, "AADSTS70008: expired\nsecond line", "a@example.com")
    assert isinstance(problem, kind)
    assert "\n" not in str(problem)
    if error == "invalid_grant":
        assert "relayd auth a@example.com" in str(problem)


def test_token_refusal_is_held_and_never_bounced() -> None:
    reply = Reply(535, "5.7.8 token endpoint refused: invalid_grant")
    assert classify_reply(Phase.TOKEN, reply) is Verdict.HELD
    assert classify_reply(Phase.TOKEN, Reply(454, "4.7.0 later")) is Verdict.DEFERRED


def test_xoauth2_response_is_the_documented_format() -> None:
    blob = xoauth2_response("alice@example.com", "ya29.token")
    assert base64.b64decode(blob) == b"user=alice@example.com\x01auth=Bearer ya29.token\x01\x01"
    assert len(xoauth2_response("a@b.c", "x" * 2500)) > 2048  # hence its own line
    with pytest.raises(ValueError):
        xoauth2_response("a\x01b", "t")


def test_error_challenge_status() -> None:
    challenge = base64.b64encode(json.dumps({"status": "401", "schemes": "bearer"}).encode())
    assert error_challenge_status(challenge.decode()) == "401"
    assert error_challenge_status("") == ""
    assert error_challenge_status("not base64 !") == ""


def test_fingerprint_follows_consent_and_secret_values() -> None:
    oauth = OAuthConfig(flow="delegated", client_id="c", client_secret=Secret("s1", "file:x"))
    account = make_account("a@example.com", password=None, oauth=oauth)
    base = credentials_fingerprint(account, "consent-1")
    assert credentials_fingerprint(account, "consent-1") == base
    assert credentials_fingerprint(account, "consent-2") != base
    changed = OAuthConfig(flow="delegated", client_id="c", client_secret=Secret("s2", "file:x"))
    other = make_account("a@example.com", password=None, oauth=changed)
    assert credentials_fingerprint(other, "consent-1") != base


# -- the registry --------------------------------------------------------------------------


class Scripted:
    """A provider answering from a script; counts calls; can block until released."""

    stores_tokens = True

    def __init__(self, answers: list[Grant | Exception]) -> None:
        self.key = "delegated:a@example.com"
        self.answers = answers
        self.calls: list[str | None] = []

    def refresh(self, refresh_token: str | None) -> Grant:
        self.calls.append(refresh_token)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def account() -> AccountConfig:
    return make_account(
        "a@example.com", password=None, oauth=OAuthConfig(flow="delegated", client_id="c")
    )


def sources(tmp_path: Path, provider: Scripted, monkeypatch: pytest.MonkeyPatch) -> TokenSources:
    monkeypatch.setattr(registry_module, "provider_for", lambda account: provider)
    return TokenSources(
        TokenStore(tmp_path, fsync=False), clock=lambda: NOW, on_secret=lambda s: None
    )


def seed(tmp_path: Path, **changes: object) -> None:
    rec = StoredTokens(
        address="a@example.com", flow="delegated", refresh_token="rt-0", consent_id="c1"
    )
    TokenStore(tmp_path, fsync=False).save(StoredTokens(**{**rec.__dict__, **changes}))


async def test_many_waiters_cause_one_refresh(
    tmp_path: Path, account: AccountConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(tmp_path)
    provider = Scripted([Grant("at-1", NOW + 3600, "rt-1")])
    tokens = sources(tmp_path, provider, monkeypatch)
    got = await asyncio.gather(*(tokens.access_token(account) for _ in range(50)))
    assert {t.value for t in got} == {"at-1"}
    assert provider.calls == ["rt-0"]
    stored = TokenStore(tmp_path, fsync=False).load("a@example.com")
    assert stored is not None and stored.refresh_token == "rt-1" and stored.consent_id == "c1"


async def test_stored_fresh_token_is_used_and_expiring_one_refreshed(
    tmp_path: Path, account: AccountConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(tmp_path, access_token="at-stored", expires_at=NOW + 3600)
    provider = Scripted([])
    assert (
        await sources(tmp_path, provider, monkeypatch).access_token(account)
    ).value == "at-stored"
    assert provider.calls == []
    seed(tmp_path, access_token="at-stored", expires_at=NOW + REFRESH_MARGIN - 1)
    provider = Scripted([Grant("at-new", NOW + 3600, None)])
    assert (await sources(tmp_path, provider, monkeypatch).access_token(account)).value == "at-new"
    stored = TokenStore(tmp_path, fsync=False).load("a@example.com")
    assert stored is not None and stored.refresh_token == "rt-0"  # not rotated: kept


async def test_unavailable_endpoint_keeps_the_file(
    tmp_path: Path, account: AccountConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(tmp_path)
    path = TokenStore(tmp_path, fsync=False).path_for("a@example.com")
    before = path.read_bytes()
    provider = Scripted([TokenEndpointUnavailable("HTTP 503")])
    with pytest.raises(TokenEndpointUnavailable):
        await sources(tmp_path, provider, monkeypatch).access_token(account)
    assert path.read_bytes() == before


async def test_no_consent_yet_needs_relayd_auth(
    tmp_path: Path, account: AccountConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = Scripted([ConsentRequired("no OAuth consent stored; run `relayd auth x`")])
    with pytest.raises(ConsentRequired):
        await sources(tmp_path, provider, monkeypatch).access_token(account)
    assert provider.calls == [None]


async def test_a_newer_consent_is_not_overwritten_by_a_rotation(
    tmp_path: Path, account: AccountConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(tmp_path)
    store = TokenStore(tmp_path, fsync=False)

    class Racing(Scripted):
        def refresh(self, refresh_token: str | None) -> Grant:
            # `relayd auth` writes a new consent while this refresh is in flight.
            store.save(
                StoredTokens(
                    address="a@example.com",
                    flow="delegated",
                    refresh_token="rt-consent",
                    consent_id="c2",
                )
            )
            return Grant("at-old-consent", NOW + 3600, "rt-rotated-old")

    provider = Racing([])
    await sources(tmp_path, provider, monkeypatch).access_token(account)
    stored = store.load("a@example.com")
    assert stored is not None and (stored.refresh_token, stored.consent_id) == ("rt-consent", "c2")


async def test_rejected_token_is_not_offered_again(
    tmp_path: Path, account: AccountConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(tmp_path, access_token="at-stored", expires_at=NOW + 3600)
    provider = Scripted([Grant("at-new", NOW + 3600, None)])
    tokens = sources(tmp_path, provider, monkeypatch)
    first = await tokens.access_token(account)
    tokens.rejected(account, first)
    assert (await tokens.access_token(account)).value == "at-new"


async def test_consent_id_and_forget(
    tmp_path: Path, account: AccountConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = sources(tmp_path, Scripted([]), monkeypatch)
    assert tokens.consent_id(account) == ""
    seed(tmp_path, consent_id="c9")
    assert tokens.consent_id(account) == "c9"
