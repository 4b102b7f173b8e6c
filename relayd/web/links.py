"""Connect links (``relayd connect ADDRESS``): random, single use, expiring, stored hashed.

A link is ``{public_url}/connect/{token}`` with 256 random bits as the token. Only the
SHA-256 of the token is kept, as the file name under ``<state>/links/``: whoever reads the
state directory learns which accounts have open links, not a link to open. Links are files,
so ``relayd connect`` works whether the daemon runs or not, as any user who may write the
state directory (root's files are handed to the directory's owner, as the token store's are).

A link is *used* when its account has been connected through it (tokens or a password
stored), not when it is opened: mail scanners and chat previews fetch links, and a wrong
sign-in should leave the owner a second try. Using it is an exclusive create of a marker
(``O_EXCL``), so two browsers finishing at once cannot both use one link.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["DEFAULT_LIFETIME", "Link", "LinkState", "LinkStore", "link_state", "new_token"]

DEFAULT_LIFETIME = 24 * 3600.0
#: Used and expired links are removed this long after their end (so a late visitor is told
#: "already used" or "expired" rather than "unknown" for a while).
KEEP_ENDED_SECONDS = 7 * 86400.0

_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")


def new_token() -> str:
    """32 random octets, base64url without padding (43 characters)."""
    return secrets.token_urlsafe(32)


def looks_like_token(text: str) -> bool:
    return _TOKEN.fullmatch(text) is not None


def digest_of(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class Link:
    digest: str  # sha256 of the token: the link's name
    account: str
    created_at: float
    expires_at: float
    used_at: float | None = None


class LinkState(enum.Enum):
    VALID = "valid"
    USED = "used"
    EXPIRED = "expired"


def link_state(link: Link, now: float) -> LinkState:
    if link.used_at is not None:
        return LinkState.USED
    if now >= link.expires_at:
        return LinkState.EXPIRED
    return LinkState.VALID


class LinkStore:
    def __init__(self, state_directory: Path) -> None:
        self.state_directory = state_directory
        self.directory = state_directory / "links"

    def _link_path(self, digest: str) -> Path:
        return self.directory / f"{digest}.json"

    def _used_path(self, digest: str) -> Path:
        return self.directory / f"{digest}.used"

    def _adopt(self, path: Path) -> None:
        if os.geteuid() != 0:
            return
        with contextlib.suppress(OSError):
            st = self.state_directory.stat()
            if st.st_uid != 0:
                os.chown(path, st.st_uid, st.st_gid)

    def create(self, account: str, lifetime: float, now: float | None = None) -> str:
        """A new link for ``account``; returns the token (shown once, never stored)."""
        now = time.time() if now is None else now
        token = new_token()
        digest = digest_of(token)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._adopt(self.directory)
        link = Link(digest, account.lower(), now, now + lifetime)
        tmp = self.directory / f".tmp-{digest}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, json.dumps(asdict(link), sort_keys=True).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self._adopt(tmp)
        os.rename(tmp, self._link_path(digest))
        self.sweep(now)
        return token

    def find(self, token: str) -> Link | None:
        """The link of ``token`` (used or not), or None if there is none."""
        if not looks_like_token(token):
            return None
        return self.by_digest(digest_of(token))

    def by_digest(self, digest: str) -> Link | None:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            return None
        try:
            doc = json.loads(self._link_path(digest).read_bytes())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("digest") != digest:
            return None
        used_at: float | None = None
        with contextlib.suppress(OSError):
            used_at = self._used_path(digest).stat().st_mtime
        try:
            return Link(
                digest=digest,
                account=str(doc["account"]),
                created_at=float(doc["created_at"]),
                expires_at=float(doc["expires_at"]),
                used_at=used_at,
            )
        except (KeyError, TypeError, ValueError):
            return None

    def use(self, link: Link) -> bool:
        """Mark the link used; False if it was used already (by someone else, just now)."""
        try:
            fd = os.open(self._used_path(link.digest), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def sweep(self, now: float) -> int:
        """Remove links that ended more than KEEP_ENDED_SECONDS ago."""
        removed = 0
        try:
            names = os.listdir(self.directory)
        except OSError:
            return 0
        for name in names:
            if not name.endswith(".json"):
                continue
            path = self.directory / name
            try:
                doc = json.loads(path.read_bytes())
                ended = float(doc["expires_at"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            used = self._used_path(name[: -len(".json")])
            with contextlib.suppress(OSError):
                ended = min(ended, used.stat().st_mtime)
            if now - ended > KEEP_ENDED_SECONDS:
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
                with contextlib.suppress(OSError):
                    used.unlink()
        return removed
