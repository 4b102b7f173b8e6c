"""Per-account records sealed at rest: the key, the seal, the atomic replace, the lock.

What the token store (``relayd.oauth.store``) and the connected app passwords
(``relayd.oauth.passwords``) both keep: one file per account under ``<state>/<kind>/``
(mode 0600, directory 0700), so one writer never races another account's. Each file is
``MAGIC || nonce(12) || AES-256-GCM(record)`` with the magic and the account address as
associated data: a file copied over another account's name, or from one kind of record to
the other, does not decrypt.

The key is the ``tokens.key`` secret of the config when set, else a key generated once into
``<state>/keys/token.key`` (0600, directory 0700). Either is stretched with HKDF-SHA256, so any
secret string works and the file key can be moved into a ``{credential: ...}`` unchanged.

Writes are atomic (temp file, fsync, rename, fsync of the directory): after a crash at any
moment the file holds the old record or the new one, never nothing and never half. A
per-account ``flock`` serialises read-check-write between the daemon and the CLI.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from relayd.config.model import Secret
from relayd.errors import RelaydError

__all__ = ["SealedFiles", "SealedFilesError"]

_NONCE = 12
_KEY_INFO = b"relayd token store v1"
_TMP_PREFIX = ".tmp-"


class SealedFilesError(RelaydError):
    """A sealed file cannot be read or written (never says anything about its content)."""


def _file_name(address: str, suffix: str) -> str:
    # Flat, fixed-length names; the address itself is inside (and bound as associated data).
    return hashlib.sha256(address.lower().encode()).hexdigest()[:32] + suffix


def _derive(secret: bytes) -> AESGCM:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEY_INFO).derive(secret)
    return AESGCM(key)


class SealedFiles:
    """``<state>/<kind>/<digest><suffix>`` files, sealed under the token key."""

    #: What the records are, for messages ("token", "password").
    what = "record"

    def __init__(
        self,
        state_directory: Path,
        *,
        kind: str,
        magic: bytes,
        suffix: str,
        key: Secret | None = None,
        fsync: bool = True,
    ) -> None:
        self.state_directory = state_directory
        self.directory = state_directory / kind
        self.key_file = state_directory / "keys" / "token.key"
        self.magic = magic
        self.suffix = suffix
        self._key_secret = key
        self.fsync = fsync
        self._aead: AESGCM | None = None

    # -- paths and key ------------------------------------------------------------------

    def path_for(self, address: str) -> Path:
        return self.directory / _file_name(address, self.suffix)

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
            raise SealedFilesError(
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

    def open_sealed(self, address: str) -> bytes | None:
        """The account's record, opened; None if it has none."""
        path = self.path_for(address)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SealedFilesError(f"cannot read {path}: {exc.strerror}") from None
        return self._open(address, blob, str(path), "file")

    def seal_bytes(self, address: str, plain: bytes) -> bytes:
        """The record sealed as in a file, for keeping elsewhere (the fleet database)."""
        nonce = secrets.token_bytes(_NONCE)
        sealed = self._cipher().encrypt(nonce, plain, self.magic + address.lower().encode())
        return self.magic + nonce + sealed

    def open_bytes(self, address: str, blob: bytes, where: str) -> bytes:
        """A record sealed by ``seal_bytes`` (on any host with the same key)."""
        return self._open(address, blob, where, "record")

    def _open(self, address: str, blob: bytes, where: str, noun: str) -> bytes:
        # The address is the associated data: a record moved to another account's name
        # does not open.
        magic = self.magic
        if not blob.startswith(magic) or len(blob) < len(magic) + _NONCE + 16:
            raise SealedFilesError(f"{where} is not a relayd {self.what} {noun}")
        nonce = blob[len(magic) : len(magic) + _NONCE]
        try:
            return self._cipher().decrypt(
                nonce, blob[len(magic) + _NONCE :], magic + address.lower().encode()
            )
        except InvalidTag:
            raise SealedFilesError(
                f"{where} cannot be decrypted with the configured token key (key changed?)"
            ) from None

    def snapshot(self) -> dict[str, tuple[int, int, int]]:
        """(inode, mtime, size) of every record: cheap change detection (a rename always
        brings a new inode)."""
        result: dict[str, tuple[int, int, int]] = {}
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return result
        for entry in entries:
            if entry.name.endswith(self.suffix):
                with contextlib.suppress(OSError):
                    st = entry.stat()
                    result[entry.name] = (st.st_ino, st.st_mtime_ns, st.st_size)
        return result

    # -- writing ------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, address: str) -> Iterator[None]:
        self._make_dir(self.directory)
        lock_path = self.path_for(address).with_suffix(".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            self._adopt_owner(lock_path)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def seal_unlocked(self, address: str, plain: bytes) -> None:
        """Write the account's record (hold ``locked(address)``)."""
        self._make_dir(self.directory)
        path = self.path_for(address)
        tmp = path.with_name(f"{_TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}")
        try:
            self._write_file(tmp, self.seal_bytes(address, plain))
            os.rename(tmp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise SealedFilesError(f"cannot write {path}: {exc.strerror}") from None
        self._sync_dir(self.directory)

    def remove_unlocked(self, address: str) -> bool:
        """Delete the account's record (hold ``locked(address)``); False if there was none."""
        path = self.path_for(address)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise SealedFilesError(f"cannot remove {path}: {exc.strerror}") from None
        self._sync_dir(self.directory)
        return True

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
        """Temp files of writers that died (their pid is gone): never a record."""
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
