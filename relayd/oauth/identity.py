"""Who signed in at the provider, from the ID token's claims, and whether it is the account.

Tokens are stored for the account's address; a consent given by another mailbox would let
relayd send as that one, or fail later with a puzzling 535. So both ways of consenting
(``relayd auth`` and the web connect page) compare the ID token's identity with the account's
address and login name before anything is stored, and store nothing when they differ.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from typing import Any

from relayd.config.model import AccountConfig

__all__ = ["IDENTITY_CLAIMS", "id_token_claims", "own_identity", "signed_in_as"]

#: Where providers put the mailbox: Microsoft ``preferred_username`` (the UPN, usually the
#: primary address) and ``upn``; Google and most others ``email``.
IDENTITY_CLAIMS = ("preferred_username", "upn", "email")


def signed_in_as(claims: Mapping[str, Any]) -> list[str]:
    """Every address the ID token names for the user, lower-cased, in claim order."""
    found: list[str] = []
    for name in IDENTITY_CLAIMS:
        value = claims.get(name)
        if isinstance(value, str) and "@" in value and value.strip().lower() not in found:
            found.append(value.strip().lower())
    return found


def own_identity(names: Iterable[str], account: AccountConfig) -> str | None:
    """The first of ``names`` that is the account (its address or its login name)."""
    mine = {account.address, account.username.lower()}
    for name in names:
        if name.lower() in mine:
            return name.lower()
    return None


def id_token_claims(id_token: object) -> dict[str, Any] | None:
    """The payload of a JWT (RFC 7519 §7.2 steps 1-7 without the signature): None if it is
    not one. The signature is not checked: relayd takes ID tokens only from the token
    endpoint's own answer over verified TLS, which OpenID Connect Core §3.1.3.7 (6) accepts
    in its place. Whether the claims are acceptable is the caller's business."""
    if not isinstance(id_token, str) or id_token.count(".") != 2:
        return None
    payload = id_token.split(".")[1]
    try:
        doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None
