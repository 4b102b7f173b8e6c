"""The token store: refresh and access tokens, encrypted at rest, replaced atomically.

One sealed file per account under ``<state>/tokens/`` (``relayd.oauth.sealed``: AES-256-GCM
under the token key, the account address bound as associated data, atomic replace, a
per-account lock), so ``relayd auth`` writing one account never races the daemon rotating
another. After a crash at any moment the file holds the old tokens or the new ones, never
nothing and never half (the rotated refresh token of Microsoft is the only copy there is —
losing it means a new consent).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from relayd.config.model import Secret
from relayd.oauth.sealed import SealedFiles, SealedFilesError

__all__ = ["MAGIC", "StoredTokens", "TokenStore", "TokenStoreError", "new_consent_id"]

MAGIC = b"relayd-tokens-v1\n"

#: The store cannot be read or written (never says anything about the tokens).
TokenStoreError = SealedFilesError


def new_consent_id() -> str:
    return secrets.token_hex(8)


@dataclass(frozen=True)
class StoredTokens:
    address: str
    flow: str
    refresh_token: str | None = field(default=None, repr=False)
    access_token: str | None = field(default=None, repr=False)
    expires_at: float = 0.0
    # Set by a new consent, kept by rotations: the scheduler's credentials fingerprint follows
    # it, so a paused account resumes after `relayd auth` and not after a routine refresh.
    consent_id: str = ""
    updated_at: float = 0.0
    # The scopes asked for at consent (``oauth.scopes``; [] for the provider's SMTP/IMAP
    # defaults); None for a record older than this field or seeded from the config. A token
    # for one resource is no good for another (an Outlook SMTP token is refused by Graph).
    scopes: list[str] | None = None

    def consented_to_other_scopes(self, scopes: tuple[str, ...]) -> bool:
        return self.scopes is not None and sorted(self.scopes) != sorted(scopes)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> StoredTokens:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in doc.items() if k in known})

    def rotated(
        self, access_token: str, expires_at: float, refresh_token: str | None, now: float
    ) -> StoredTokens:
        return replace(
            self,
            access_token=access_token,
            expires_at=expires_at,
            refresh_token=refresh_token or self.refresh_token,
            updated_at=now,
        )


class TokenStore(SealedFiles):
    what = "token"

    def __init__(
        self, state_directory: Path, *, key: Secret | None = None, fsync: bool = True
    ) -> None:
        super().__init__(
            state_directory, kind="tokens", magic=MAGIC, suffix=".tokens", key=key, fsync=fsync
        )

    def load(self, address: str) -> StoredTokens | None:
        """The account's tokens, or None if it has none stored."""
        plain = self.open_sealed(address)
        if plain is None:
            return None
        path = self.path_for(address)
        try:
            record = StoredTokens.from_json(plain)
        except (ValueError, TypeError):
            raise TokenStoreError(f"{path} holds no valid token record") from None
        if record.address.lower() != address.lower():
            raise TokenStoreError(f"{path} belongs to another account")
        return record

    def seal_record(self, record: StoredTokens) -> bytes:
        """The record sealed for the fleet database (the same sealing as the file)."""
        return self.seal_bytes(record.address, record.to_json())

    def open_record(self, address: str, blob: bytes) -> StoredTokens:
        where = f"the fleet token row of {address}"
        plain = self.open_bytes(address, blob, where)
        try:
            record = StoredTokens.from_json(plain)
        except (ValueError, TypeError):
            raise TokenStoreError(f"{where} holds no valid token record") from None
        if record.address.lower() != address.lower():
            raise TokenStoreError(f"{where} belongs to another account")
        return record

    def save(self, record: StoredTokens) -> None:
        with self.locked(record.address):
            self.seal_unlocked(record.address, record.to_json())

    def remove(self, address: str) -> tuple[bool, StoredTokens | None]:
        """Delete the account's tokens (``relayd auth --revoke``): whether there was a file,
        and the record it held (None if unreadable: it is deleted all the same)."""
        with self.locked(address):
            try:
                record = self.load(address)
            except TokenStoreError:
                record = None
            return self.remove_unlocked(address), record

    def update(
        self, address: str, change: Callable[[StoredTokens | None], StoredTokens | None]
    ) -> StoredTokens | None:
        """Read, ``change``, write — under the account's lock. ``change`` returning None
        leaves the file as it is; the record on disk afterwards is returned."""
        with self.locked(address):
            current = self.load(address)
            new = change(current)
            if new is None:
                return current
            self.seal_unlocked(new.address, new.to_json())
            return new
