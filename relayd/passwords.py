"""Client password hashes: ``$scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt b64>$<hash b64>``.

scrypt from the standard library (RFC 7914). The cost is modest on purpose: the SMTP server
verifies AUTH attempts with it, and aiosmtpd's authenticator runs on the event loop.
N=2^14, r=8 costs 16 MiB and a few tens of milliseconds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

__all__ = ["ScryptHash", "hash_password", "parse_hash", "verify_password"]

LOG2_N = 14
BLOCK_SIZE = 8
PARALLELISM = 1
SALT_BYTES = 16
KEY_BYTES = 32

# Limits on what a config may ask for: a hash with a huge cost would stall the event loop (or
# exhaust memory) on every AUTH attempt.
_MAX_MEMORY = 256 * 2**20
_MAX_LOG2_N = 20
_MAX_R = 32
_MAX_P = 16

_FORMAT = re.compile(
    r"\$scrypt\$ln=([0-9]{1,2}),r=([0-9]{1,3}),p=([0-9]{1,3})\$([A-Za-z0-9+/]+=*)\$([A-Za-z0-9+/]+=*)"
)


@dataclass(frozen=True)
class ScryptHash:
    log2_n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    @property
    def memory(self) -> int:
        # RFC 7914 §6: scrypt uses 128 * r * N bytes, plus 128 * r * p for the blocks.
        return 128 * self.r * ((1 << self.log2_n) + self.p)

    def encode(self) -> str:
        return (
            f"$scrypt$ln={self.log2_n},r={self.r},p={self.p}"
            f"${_b64encode(self.salt)}${_b64encode(self.key)}"
        )


def _b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    text = text.rstrip("=")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def parse_hash(encoded: str) -> ScryptHash:
    """The parts of an encoded hash; ValueError (with a reason) if it is malformed or its cost
    is out of bounds. The reason never contains the hash itself."""
    match = _FORMAT.fullmatch(encoded)
    if match is None:
        raise ValueError("expected $scrypt$ln=<log2 N>,r=<r>,p=<p>$<salt>$<hash>")
    log2_n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    try:
        salt = _b64decode(match.group(4))
        key = _b64decode(match.group(5))
    except (binascii.Error, ValueError):
        raise ValueError("the salt or hash is not valid base64") from None
    if not (1 <= log2_n <= _MAX_LOG2_N and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        raise ValueError(f"cost out of range (ln 1-{_MAX_LOG2_N}, r 1-{_MAX_R}, p 1-{_MAX_P})")
    parsed = ScryptHash(log2_n, r, p, salt, key)
    if parsed.memory > _MAX_MEMORY:
        raise ValueError("cost too high: scrypt would need more than 256 MiB per check")
    if len(salt) < 8 or len(key) < 16:
        raise ValueError("salt or hash too short")
    return parsed


def _derive(password: str, params: ScryptHash) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=params.salt,
        n=1 << params.log2_n,
        r=params.r,
        p=params.p,
        dklen=len(params.key),
        maxmem=params.memory + 2**20,
    )


def hash_password(password: str) -> str:
    """A new hash of ``password`` with a random salt."""
    params = ScryptHash(LOG2_N, BLOCK_SIZE, PARALLELISM, os.urandom(SALT_BYTES), b"\0" * KEY_BYTES)
    key = _derive(password, params)
    return ScryptHash(params.log2_n, params.r, params.p, params.salt, key).encode()


def verify_password(password: str, encoded: str) -> bool:
    """True if ``password`` matches; False for a wrong password or a malformed hash."""
    try:
        params = parse_hash(encoded)
    except ValueError:
        return False
    return hmac.compare_digest(_derive(password, params), params.key)
