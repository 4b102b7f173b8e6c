"""Spool files encrypted at rest (SPEC ``spool.encrypt_at_rest``): AES-256-GCM in segments.

A message may be tens of MiB; it is written as it arrives and read as it is sent, so it is
never held whole in memory. Its content is therefore sealed in segments of ``SEGMENT``
bytes, each its own AES-GCM message, in the manner of the STREAM construction (Hoang,
Reyhanitabar, Rogaway, Vizár, "Online authenticated-encryption and its nonce-reuse
misuse-resistance", CRYPTO 2015): the nonce holds the segment's number and a flag on the
last one, so segments cannot be reordered, dropped or the file cut after a whole segment
without the read failing. The envelope is sealed once more under a nonce of its own.

Every file has its own AES key, derived with HKDF-SHA256 from ``spool.key``, a random salt
kept in the file and the queue id: segment numbers can then serve as nonces with no risk of
a nonce used twice under one key, and a file renamed to another queue id does not open.
Every segment is authenticated before a byte of it is used: nothing tampered with is ever
sent upstream. A message's delivery-state file (which recipients are done, the last upstream
reply) is sealed whole, under a key of its own at every write.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from relayd.config.model import SpoolConfig
from relayd.errors import SpoolError

__all__ = [
    "SALT_BYTES",
    "SEALED_STATE",
    "SEGMENT",
    "FileCipher",
    "SegmentSealer",
    "SpoolKey",
    "plaintext_length",
    "spool_key",
]

SEGMENT = 1 << 16
TAG_BYTES = 16
SALT_BYTES = 16
_SEALED_SEGMENT = SEGMENT + TAG_BYTES
_INFO = b"relayd spool file\0"
_STATE_INFO = b"relayd spool state\0"
# How a sealed delivery-state file starts (a plain one is JSON: "{").
SEALED_STATE = b"RELAYD1S "
# Segment nonces are the 11-byte segment number and a last-segment flag of 0 or 1; the
# envelope's flag, 2, keeps it apart from every segment.
_ENVELOPE_NONCE = bytes(11) + b"\x02"


def _nonce(index: int, last: bool) -> bytes:
    return index.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


def plaintext_length(sealed_length: int) -> int:
    """The content length of ``sealed_length`` bytes of sealed segments (every segment but
    the last is full; the last holds at least one byte unless the content is empty)."""
    segments = max(1, -(-sealed_length // _SEALED_SEGMENT))
    return sealed_length - segments * TAG_BYTES


class SpoolKey:
    """``spool.key``: opens every sealed file; seals new ones when ``seal_new`` is set."""

    def __init__(self, secret: bytes, *, seal_new: bool) -> None:
        self._secret = secret
        self.seal_new = seal_new

    def for_file(self, salt: bytes, queue_id: str) -> FileCipher:
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=salt, info=_INFO + queue_id.encode()
        ).derive(self._secret)
        return FileCipher(AESGCM(key), queue_id)

    def new_file(self, queue_id: str) -> tuple[bytes, FileCipher]:
        salt = os.urandom(SALT_BYTES)
        return salt, self.for_file(salt, queue_id)

    def seal_state(self, queue_id: str, data: bytes) -> bytes:
        """A delivery-state file (small, rewritten whole): a fresh salt, so a fresh key, at
        every write; the key's purpose is in the derivation, apart from message files'."""
        salt = os.urandom(SALT_BYTES)
        return (
            SEALED_STATE
            + salt
            + self._state_cipher(salt, queue_id).encrypt(_ENVELOPE_NONCE, data, None)
        )

    def open_state(self, queue_id: str, sealed: bytes) -> bytes:
        body = sealed[len(SEALED_STATE) :]
        salt, rest = body[:SALT_BYTES], body[SALT_BYTES:]
        try:
            return self._state_cipher(salt, queue_id).decrypt(_ENVELOPE_NONCE, rest, None)
        except InvalidTag:
            raise SpoolError(
                f"{queue_id}: delivery state does not open with spool.key "
                "(another key, or the file was altered)"
            ) from None

    def _state_cipher(self, salt: bytes, queue_id: str) -> AESGCM:
        key = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=salt,
            info=_STATE_INFO + queue_id.encode(),
        ).derive(self._secret)
        return AESGCM(key)


def spool_key(spool: SpoolConfig) -> SpoolKey | None:
    """The key to open sealed files with: configured also after ``encrypt_at_rest`` was
    turned off, as long as sealed files remain in the spool."""
    if spool.key is None:
        return None
    return SpoolKey(spool.key.reveal().encode(), seal_new=spool.encrypt_at_rest)


class FileCipher:
    """The key of one message file."""

    def __init__(self, aead: AESGCM, queue_id: str) -> None:
        self._aead = aead
        self.queue_id = queue_id

    def seal_envelope(self, data: bytes) -> bytes:
        return self._aead.encrypt(_ENVELOPE_NONCE, data, None)

    def open_envelope(self, sealed: bytes) -> bytes:
        return self._open(_ENVELOPE_NONCE, sealed, "envelope")

    def sealer(self) -> SegmentSealer:
        return SegmentSealer(self._aead)

    def open_all(self, sealed: bytes) -> bytes:
        """All the content of ``sealed`` (every segment, in one piece of memory)."""
        return b"".join(self.iter_open(_reader(sealed), len(sealed)))

    def iter_open(self, read: Callable[[int], bytes], sealed_length: int) -> Iterator[bytes]:
        """The content segment by segment, ``read(n)`` giving the sealed bytes in order."""
        index = 0
        left = sealed_length
        while True:
            size = min(_SEALED_SEGMENT, left)
            sealed = read(size)
            if len(sealed) != size:
                raise SpoolError(f"{self.queue_id}: message file shrank while reading")
            left -= size
            last = left == 0
            if size < TAG_BYTES:
                raise SpoolError(f"{self.queue_id}: sealed content cut short")
            yield self._open(_nonce(index, last), sealed, f"segment {index}")
            if last:
                return
            index += 1

    def _open(self, nonce: bytes, sealed: bytes, what: str) -> bytes:
        try:
            return self._aead.decrypt(nonce, sealed, None)
        except InvalidTag:
            raise SpoolError(
                f"{self.queue_id}: {what} does not open with spool.key "
                "(another key, or the file was altered)"
            ) from None


class SegmentSealer:
    """Content in, in pieces of any size; sealed segments out, then the last at ``finish``.

    A full segment is held back until more content arrives, so the last segment is never
    empty unless the whole content is: ``plaintext_length`` relies on that.
    """

    def __init__(self, aead: AESGCM) -> None:
        self._aead = aead
        self._buffer = bytearray()
        self._index = 0

    def feed(self, content: bytes) -> list[bytes]:
        self._buffer += content
        sealed: list[bytes] = []
        while len(self._buffer) > SEGMENT:
            segment = bytes(self._buffer[:SEGMENT])
            del self._buffer[:SEGMENT]
            sealed.append(self._aead.encrypt(_nonce(self._index, False), segment, None))
            self._index += 1
        return sealed

    def finish(self) -> bytes:
        last = self._aead.encrypt(_nonce(self._index, True), bytes(self._buffer), None)
        self._buffer = bytearray()
        return last


def _reader(data: bytes) -> Callable[[int], bytes]:
    view = memoryview(data)
    position = 0

    def read(size: int) -> bytes:
        nonlocal position
        chunk = bytes(view[position : position + size])
        position += len(chunk)
        return chunk

    return read
