"""Consent for people (relayd.oauth.consent, identity, revocation): whose tokens may be
stored for an account, where a refresh token is revoked, and deleting the stored ones."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from factories import make_account

from relayd.config.model import AccountConfig, OAuthConfig
from relayd.oauth.consent import identity_refusal
from relayd.oauth.flows import ConsentResult
from relayd.oauth.identity import own_identity, signed_in_as
from relayd.oauth.revocation import GOOGLE_REVOKE_URL, revocation_url
from relayd.oauth.store import StoredTokens, TokenStore


def oauth_account(provider: str, flow: str = "delegated") -> AccountConfig:
    return make_account(
        "alice@acme.example",
        provider=provider,
        password=None,
        username="alice.login@acme.example",
        oauth=OAuthConfig(flow=flow, client_id="client"),
    )


def consent(*identities: str, verified: bool = True) -> ConsentResult:
    return ConsentResult("refresh", "access", 0.0, identities=identities, verified=verified)


@pytest.mark.parametrize(
    ("provider", "flow", "result", "refusal"),
    [
        ("microsoft365", "delegated", consent("alice@acme.example"), None),
        # The login name, which the account logs in as, is the account too.
        ("gmail", "delegated", consent("alice.login@acme.example"), None),
        # Any claim naming the account will do (preferred_username, then email ...).
        ("microsoft365", "delegated", consent("other@acme.example", "alice@acme.example"), None),
        (
            "microsoft365",
            "delegated",
            consent("mallory@acme.example"),
            "you signed in as mallory@acme.example, not alice@acme.example",
        ),
        ("gmail", "delegated", consent(), "does not say who signed in (no ID token)"),
        (
            "gmail",
            "delegated",
            consent("alice@acme.example", verified=False),
            "alice@acme.example is not a verified address",
        ),
        # A refresh token pasted for a generic provider names nobody: nothing to compare.
        ("custom", "refresh_token", consent(), None),
    ],
)
def test_whose_consent_may_be_stored(
    provider: str, flow: str, result: ConsentResult, refusal: str | None
) -> None:
    found = identity_refusal(oauth_account(provider, flow), result)
    if refusal is None:
        assert found is None
    else:
        assert found is not None and refusal in found


def test_identities_come_from_the_address_claims_in_order() -> None:
    claims = {"preferred_username": "Alice@Acme.Example", "upn": "alice@acme.example", "sub": "x"}
    assert signed_in_as(claims) == ["alice@acme.example"]
    assert signed_in_as({"email": "not-an-address", "name": "Alice"}) == []
    account = oauth_account("gmail")
    assert own_identity(["mallory@x.example", "ALICE@acme.example"], account) == (
        "alice@acme.example"
    )
    assert own_identity(["mallory@x.example"], account) is None


def test_where_a_refresh_token_is_revoked() -> None:
    delegated = OAuthConfig(flow="delegated", client_id="client")
    assert revocation_url("gmail", delegated) == GOOGLE_REVOKE_URL
    # Microsoft's identity platform cannot revoke one refresh token.
    assert revocation_url("microsoft365", delegated) is None
    own = replace(delegated, revoke_url="https://idp.example/revoke")
    assert revocation_url("custom", own) == "https://idp.example/revoke"


def test_removing_stored_tokens_returns_what_they_were(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, fsync=False)
    record = StoredTokens(
        address="alice@acme.example",
        flow="delegated",
        refresh_token="refresh-1",
        access_token=None,
        expires_at=0.0,
        consent_id="c1",
        updated_at=0.0,
    )
    store.save(record)
    assert store.remove("Alice@acme.example") == (True, record)
    assert not store.path_for(record.address).exists()
    assert store.remove(record.address) == (False, None)
    # An unreadable file is deleted all the same.
    store.path_for(record.address).write_bytes(b"garbage")
    assert store.remove(record.address) == (True, None)
