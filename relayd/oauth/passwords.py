"""App passwords that mailbox owners gave on the web connect page (``password: {connect:
true}``), sealed at rest like the OAuth tokens (``relayd.oauth.sealed``, the same key).

The daemon logs in with the stored password over SMTP and IMAP; until one is stored the
account has nothing to log in with and its mail is held, like an OAuth account that has not
consented. A new password comes with a new consent id, which enters the account's
credentials fingerprint: a paused account resumes when its owner connects again.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from relayd.config.model import AccountConfig, Config, Secret
from relayd.log import redactor
from relayd.oauth.sealed import SealedFiles, SealedFilesError
from relayd.oauth.store import new_consent_id

__all__ = ["ConnectedPassword", "ConnectedPasswords", "PasswordStore", "passwords_for"]

MAGIC = b"relayd-password-v1\n"


@dataclass(frozen=True)
class ConnectedPassword:
    address: str
    password: str = field(repr=False)
    consent_id: str = field(default_factory=new_consent_id)
    saved_at: float = field(default_factory=time.time)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ConnectedPassword:
        doc = json.loads(data)
        if not isinstance(doc, dict) or not isinstance(doc.get("password"), str):
            raise ValueError("not a password record")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in doc.items() if k in known})


class PasswordStore(SealedFiles):
    what = "password"

    def __init__(
        self, state_directory: Path, *, key: Secret | None = None, fsync: bool = True
    ) -> None:
        super().__init__(
            state_directory,
            kind="passwords",
            magic=MAGIC,
            suffix=".password",
            key=key,
            fsync=fsync,
        )

    def load(self, address: str) -> ConnectedPassword | None:
        plain = self.open_sealed(address)
        if plain is None:
            return None
        path = self.path_for(address)
        try:
            record = ConnectedPassword.from_json(plain)
        except (ValueError, TypeError):
            raise SealedFilesError(f"{path} holds no valid password record") from None
        if record.address.lower() != address.lower():
            raise SealedFilesError(f"{path} belongs to another account")
        return record

    def save(self, record: ConnectedPassword) -> None:
        with self.locked(record.address):
            self.seal_unlocked(record.address, record.to_json())

    def remove(self, address: str) -> bool:
        with self.locked(address):
            return self.remove_unlocked(address)


class ConnectedPasswords:
    """The daemon's view of the store: the password to log in with, and its consent id."""

    def __init__(self, store: PasswordStore) -> None:
        self.store = store

    def use_store(self, store: PasswordStore) -> None:
        """Another store (``tokens.key`` changed at a reload)."""
        self.store = store

    async def password(self, account: AccountConfig) -> str | None:
        """The stored password, or None while the owner has not connected; raises
        SealedFilesError when the file is there but cannot be opened."""
        record = await asyncio.to_thread(self.store.load, account.address)
        if record is None:
            return None
        redactor.add_secret(record.password)
        return record.password

    def consent_id(self, account: AccountConfig) -> str:
        if not account.connect_password:
            return ""
        try:
            record = self.store.load(account.address)
        except SealedFilesError:
            return "unreadable"
        return record.consent_id if record is not None else ""


def passwords_for(config: Config, *, fsync: bool = True) -> ConnectedPasswords:
    """The connected passwords of ``config``'s state directory and ``tokens.key``."""
    return ConnectedPasswords(
        PasswordStore(config.state_directory, key=config.tokens_key, fsync=fsync)
    )
