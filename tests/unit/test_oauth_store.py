"""The encrypted token store: round trip, binding to the account, keys, atomic writes."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from relayd.config.model import Secret
from relayd.oauth.store import MAGIC, StoredTokens, TokenStore, TokenStoreError, new_consent_id


def record(address: str = "alice@example.com", n: int = 1) -> StoredTokens:
    return StoredTokens(
        address=address,
        flow="delegated",
        refresh_token=f"refresh-secret-{n}-" + "r" * 40,
        access_token=f"access-secret-{n}-" + "a" * 40,
        expires_at=1_900_000_000.0,
        consent_id="c1",
        updated_at=1_800_000_000.0,
    )


def test_round_trip_and_nothing_in_clear(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, fsync=False)
    rec = record()
    store.save(rec)
    assert store.load("Alice@Example.com") == rec
    blob = store.path_for(rec.address).read_bytes()
    assert blob.startswith(MAGIC)
    for secret in (rec.refresh_token, rec.access_token):
        assert secret is not None
        assert secret.encode() not in blob
        assert base64.b64encode(secret.encode()) not in blob
    assert "secret" not in repr(rec)


def test_modes_of_files_and_directories(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, fsync=False)
    store.save(record())
    assert store.path_for("alice@example.com").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "tokens").stat().st_mode & 0o777 == 0o700
    assert store.key_file.stat().st_mode & 0o777 == 0o600
    assert store.key_file.parent.stat().st_mode & 0o777 == 0o700


def test_missing_account_is_none(tmp_path: Path) -> None:
    assert TokenStore(tmp_path, fsync=False).load("nobody@example.com") is None


def test_generated_key_is_reused_and_a_configured_key_wins(tmp_path: Path) -> None:
    TokenStore(tmp_path, fsync=False).save(record())
    assert TokenStore(tmp_path, fsync=False).load("alice@example.com") == record()
    other = TokenStore(tmp_path, key=Secret("a configured key", "literal"), fsync=False)
    with pytest.raises(TokenStoreError, match="cannot be decrypted"):
        other.load("alice@example.com")
    other.save(record(n=2))
    assert other.load("alice@example.com") == record(n=2)


def test_file_renamed_to_another_account_does_not_decrypt(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, fsync=False)
    store.save(record("alice@example.com"))
    os.replace(store.path_for("alice@example.com"), store.path_for("bob@example.com"))
    with pytest.raises(TokenStoreError):
        store.load("bob@example.com")


def test_tampered_or_truncated_file_is_refused(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, fsync=False)
    store.save(record())
    path = store.path_for("alice@example.com")
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(TokenStoreError):
        store.load("alice@example.com")
    path.write_bytes(MAGIC[:5])
    with pytest.raises(TokenStoreError, match="not a relayd token file"):
        store.load("alice@example.com")


def test_update_can_decline_and_sees_the_current_record(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, fsync=False)
    store.save(record(n=1))
    kept = store.update("alice@example.com", lambda current: None)
    assert kept == record(n=1)
    changed = store.update(
        "alice@example.com",
        lambda current: current.rotated("new-access", 5.0, None, 6.0) if current else None,
    )
    assert changed is not None and changed.refresh_token == record(n=1).refresh_token
    assert store.load("alice@example.com") == changed


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, fsync=False)
    store.save(record())
    dead = tmp_path / "tokens" / ".tmp-999999999-abcd"
    mine = tmp_path / "tokens" / f".tmp-{os.getpid()}-abcd"
    dead.write_bytes(b"half")
    mine.write_bytes(b"in flight")
    assert store.remove_stale_temp_files() == 1
    assert not dead.exists() and mine.exists()
    assert store.load("alice@example.com") == record()


def test_snapshot_changes_when_a_file_is_replaced(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, fsync=False)
    assert store.snapshot() == {}
    store.save(record(n=1))
    first = store.snapshot()
    store.save(record(n=1))
    assert store.snapshot() != first  # new inode on every atomic replace


def test_consent_ids_differ() -> None:
    assert new_consent_id() != new_consent_id()


# -- app passwords given on the connect page: sealed the same way ------------------------------


def test_connected_password_is_sealed_and_bound_to_its_kind(tmp_path: Path) -> None:
    from relayd.oauth.passwords import ConnectedPassword, PasswordStore

    passwords = PasswordStore(tmp_path, fsync=False)
    saved = ConnectedPassword("alice@example.com", "app-pass-never-in-clear")
    passwords.save(saved)
    assert passwords.load("ALICE@example.com") == saved
    blob = passwords.path_for(saved.address).read_bytes()
    assert b"app-pass-never-in-clear" not in blob
    assert base64.b64encode(b"app-pass-never-in-clear") not in blob
    assert passwords.path_for(saved.address).stat().st_mode & 0o777 == 0o600
    assert "app-pass" not in repr(saved)
    # One key for both kinds (the token key), but a password file is no token file.
    tokens = TokenStore(tmp_path, fsync=False)
    assert passwords.key_file == tokens.key_file
    tokens.directory.mkdir(mode=0o700)
    os.link(passwords.path_for(saved.address), tokens.path_for(saved.address))
    with pytest.raises(TokenStoreError, match="not a relayd token file"):
        tokens.load(saved.address)
    assert passwords.remove(saved.address) and passwords.load(saved.address) is None
    assert not passwords.remove(saved.address)


async def test_a_connect_account_without_a_password_is_refused_like_no_consent(
    tmp_path: Path,
) -> None:
    from dataclasses import replace

    from factories import make_account

    from relayd.core.outcome import Failure, FailureKind
    from relayd.oauth.passwords import ConnectedPassword, ConnectedPasswords, PasswordStore
    from relayd.upstream.credentials import AccountCredentials, Mechanism
    from relayd.upstream.transport import AttemptError

    account = replace(make_account("bob@example.com", password=None), connect_password=True)
    store = PasswordStore(tmp_path, fsync=False)
    credentials = AccountCredentials(None, ConnectedPasswords(store))
    with pytest.raises(AttemptError) as info:
        await credentials.obtain(account)
    # Said by relayd, not the mail server: a consent failure (held), no made-up 535.
    outcome = info.value.outcome
    assert isinstance(outcome, Failure) and outcome.kind is FailureKind.CONSENT
    assert "relayd connect bob@example.com" in outcome.detail
    before = ConnectedPasswords(store).consent_id(account)
    store.save(ConnectedPassword(account.address, "given-on-the-page"))
    got = await credentials.obtain(account)
    assert (got.secret, got.mechanism) == ("given-on-the-page", Mechanism.PASSWORD)
    assert ConnectedPasswords(store).consent_id(account) not in ("", before)
