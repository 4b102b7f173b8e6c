"""The token store: refresh and access tokens, encrypted at rest, replaced atomically.

One file per account under ``<state>/tokens/`` (mode 0600, directory 0700), so ``relayd auth``
writing one account never races the daemon rotating another. Each file is
``MAGIC || nonce(12) || AES-256-GCM(JSON)`` with the magic and the account address as
associated data: a file copied over another account's name does not decrypt.

The key is the ``tokens.key`` secret of the config when set, else a key generated once into
``<state>/keys/token.key`` (0600, directory 0700). Either is stretched with HKDF-SHA256, so any
secret string works and the file key can be moved into a ``{credential: ...}`` unchanged.

Writes are atomic (temp file, fsync, rename, fsync of the directory): after a crash at any
moment the file holds the old tokens or the new ones, never nothing and never half (the
rotated refresh token of Microsoft is the only copy there is — losing it means a new consent).
A per-account ``flock`` serialises read-check-write between the daemon and ``relayd auth``.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from relayd.config.model import Secret
from relayd.errors import RelaydError

__all__ = ["StoredTokens", "TokenStore", "TokenStoreError", "new_consent_id"]

MAGIC = b"relayd-tokens-v1\n"
_NONCE = 12
_KEY_INFO = b"relayd token store v1"
_TMP_PREFIX = ".tmp-"


class TokenStoreError(RelaydError):
    """The store cannot be read or written (never says anything about the tokens)."""


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


def _file_name(address: str) -> str:
    # Flat, fixed-length names; the address itself is inside (and bound as associated data).
    return hashlib.sha256(address.lower().encode()).hexdigest()[:32] + ".tokens"


def _derive(secret: bytes) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEY_INFO).derive(secret)
    return AESGCM(key)


class TokenStore:
    def __init__(
        self, state_directory: Path, *, key: Secret | None = None, fsync: bool = True
    ) -> None:
        self.state_directory = state_directory
        self.directory = state_directory / "tokens"
        self.key_file = state_directory / "keys" / "token.key"
        self._key_secret = key
        self.fsync = fsync
        self._aead: AESGCM | None = None

    # -- paths and key ------------------------------------------------------------------

    def path_for(self, address: str) -> Path:
        return self.directory / _file_name(address)

    def _make_dir(self, path: Path) -> None:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._adopt_owner(path)

    def _adopt_owner(self, path: Path) -> None:
        """Run as root (``sudo relayd auth``), hand new files to the owner of the state
        directory, so the daemon's own user can still read them."""
        if os.geteuid() != 0:
            return
        with contextlib.suppress(OSError):
            st = self.state_directory.stat()
            if st.st_uid != 0:
                os.chown(path, st.st_uid, st.st_gid)

    def _cipher(self) -> AESGCM:
        if self._aead is None:
            if self._key_secret is not None:
                self._aead = _derive(self._key_secret.reveal().encode())
            else:
                self._aead = _derive(self._load_or_create_key_file())
        return self._aead

    def _load_or_create_key_file(self) -> bytes:
        try:
            return self.key_file.read_bytes().strip()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise TokenStoreError(
                f"cannot read the token key {self.key_file}: {exc.strerror}"
            ) from None
        self._make_dir(self.key_file.parent)
        material = base64.b64encode(secrets.token_bytes(32)) + b"\n"
        tmp = self.key_file.with_name(f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
        self._write_file(tmp, material)
        try:
            # link() fails if another process created the key first: then use theirs.
            os.link(tmp, self.key_file)
            self._sync_dir(self.key_file.parent)
        except FileExistsError:
            pass
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return self.key_file.read_bytes().strip()

    # -- reading ------------------------------------------------------------------------

    def load(self, address: str) -> StoredTokens | None:
        """The account's tokens, or None if it has none stored."""
        path = self.path_for(address)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TokenStoreError(f"cannot read {path}: {exc.strerror}") from None
        return self._decrypt(address, blob, path)

    def _decrypt(self, address: str, blob: bytes, path: Path) -> StoredTokens:
        if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + _NONCE + 16:
            raise TokenStoreError(f"{path} is not a relayd token file")
        nonce = blob[len(MAGIC) : len(MAGIC) + _NONCE]
        try:
            plain = self._cipher().decrypt(
                nonce, blob[len(MAGIC) + _NONCE :], MAGIC + address.lower().encode()
            )
            record = StoredTokens.from_json(plain)
        except InvalidTag:
            raise TokenStoreError(
                f"{path} cannot be decrypted with the configured token key (key changed?)"
            ) from None
        except (ValueError, TypeError):
            raise TokenStoreError(f"{path} holds no valid token record") from None
        if record.address.lower() != address.lower():
            raise TokenStoreError(f"{path} belongs to another account")
        return record

    def snapshot(self) -> dict[str, tuple[int, int, int]]:
        """(inode, mtime, size) of every token file: cheap change detection (a rename
        always brings a new inode)."""
        result: dict[str, tuple[int, int, int]] = {}
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return result
        for entry in entries:
            if entry.name.endswith(".tokens"):
                with contextlib.suppress(OSError):
                    st = entry.stat()
                    result[entry.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return result

    # -- writing ------------------------------------------------------------------------

    def save(self, record: StoredTokens) -> None:
        with self._locked(record.address):
            self._save_unlocked(record)

    def update(
        self, address: str, change: Callable[[StoredTokens | None], StoredTokens | None]
    ) -> StoredTokens | None:
        """Read, ``change``, write — under the account's lock. ``change`` returning None
        leaves the file as it is; the record on disk afterwards is returned."""
        with self._locked(address):
            current = self.load(address)
            new = change(current)
            if new is None:
                return current
            self._save_unlocked(new)
            return new

    @contextlib.contextmanager
    def _locked(self, address: str) -> Iterator[None]:
        self._make_dir(self.directory)
        lock_path = self.path_for(address).with_suffix(".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._adopt_owner(lock_path)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _save_unlocked(self, record: StoredTokens) -> None:
        self._make_dir(self.directory)
        path = self.path_for(record.address)
        nonce = secrets.token_bytes(_NONCE)
        sealed = self._cipher().encrypt(
            nonce, record.to_json(), MAGIC + record.address.lower().encode()
        )
        tmp = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            self._write_file(tmp, MAGIC + nonce + sealed)
            os.rename(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise TokenStoreError(f"cannot write {path}: {exc.strerror}") from None
        self._sync_dir(self.directory)

    def _write_file(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        self._adopt_owner(path)

    def _sync_dir(self, directory: Path) -> None:
        if not self.fsync:
            return
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove_stale_temp_files(self) -> int:
        """Temp files of writers that died (their pid is gone): never a token file."""
        removed = 0
        for directory in (self.directory, self.key_file.parent):
            try:
                names = os.listdir(directory)
            except OSError:
                continue
            for name in names:
                if not name.startswith(_TMP_PREFIX):
                    continue
                pid_text = name[len(_TMP_PREFIX) :].split("-", 1)[0]
                if pid_text.isdigit() and _alive(int(pid_text)):
                    continue
                with contextlib.suppress(OSError):
                    os.unlink(directory / name)
                    removed += 1
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True
