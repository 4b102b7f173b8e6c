"""Client password hashes (`relayd hash-password`, clients.*.password_hash)."""

from __future__ import annotations

import hashlib
import re

import pytest

from relayd.passwords import ScryptHash, hash_password, parse_hash, verify_password


def test_round_trip() -> None:
    encoded = hash_password("correct horse")
    assert verify_password("correct horse", encoded)


def test_wrong_password() -> None:
    encoded = hash_password("correct horse")
    assert not verify_password("correct horsE", encoded)
    assert not verify_password("", encoded)


def test_format_and_parameters() -> None:
    encoded = hash_password("pw")
    assert re.fullmatch(r"\$scrypt\$ln=14,r=8,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}", encoded)
    parsed = parse_hash(encoded)
    assert (parsed.log2_n, parsed.r, parsed.p) == (14, 8, 1)
    assert len(parsed.salt) == 16
    assert len(parsed.key) == 32


def test_salt_is_random() -> None:
    assert hash_password("same") != hash_password("same")


def test_non_ascii_password() -> None:
    encoded = hash_password("pässwörd-密码")
    assert verify_password("pässwörd-密码", encoded)
    assert not verify_password("passwort", encoded)


def test_other_cost_parameters_verify() -> None:
    # A hash made with other (valid) parameters still verifies: the cost is read from it.
    params = ScryptHash(4, 2, 1, b"0123456789abcdef", b"\0" * 16)
    key = hashlib.scrypt(b"pw", salt=params.salt, n=16, r=2, p=1, dklen=16)
    encoded = ScryptHash(4, 2, 1, params.salt, key).encode()
    assert verify_password("pw", encoded)
    assert not verify_password("px", encoded)


def test_padding_is_accepted() -> None:
    encoded = hash_password("pw")
    prefix, salt, key = encoded.rsplit("$", 2)
    assert verify_password("pw", f"{prefix}${salt}==${key}=")


@pytest.mark.parametrize(
    ("encoded", "reason"),
    [
        ("", "expected $scrypt$"),
        ("$scrypt$...", "expected $scrypt$"),
        ("$2b$12$abcdefghijklmnopqrstuv", "expected $scrypt$"),
        ("$scrypt$ln=14,r=8,p=1$c2FsdHNhbHQ$", "expected $scrypt$"),
        ("$scrypt$ln=14,r=8,p=1$c2FsdHNhbHQ$a", "not valid base64"),
        ("$scrypt$ln=30,r=8,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43, "cost out of range"),
        ("$scrypt$ln=0,r=8,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43, "cost out of range"),
        ("$scrypt$ln=20,r=32,p=1$c2FsdHNhbHRzYWx0$" + "A" * 43, "cost too high"),
        ("$scrypt$ln=14,r=8,p=1$c2FsdA$" + "A" * 43, "too short"),
    ],
)
def test_malformed_hashes(encoded: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_hash(encoded)
    assert not verify_password("anything", encoded)
