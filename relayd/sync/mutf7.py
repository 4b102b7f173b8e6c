"""Modified UTF-7, the encoding of IMAP mailbox names (RFC 3501 §5.1.3).

Printable US-ASCII stands for itself, except "&", which is written "&-"; every other run of
characters is UTF-16BE, base64-encoded with "," instead of "/" and without padding, between
"&" and "-". "Gesendete Objekte" stays as it is; "Éléments envoyés" becomes
"&AMk-l&AOk-ments envoy&AOk-s".
"""

from __future__ import annotations

import base64
import binascii

__all__ = ["decode", "encode"]


def _is_direct(char: str) -> bool:
    return 0x20 <= ord(char) <= 0x7E


def _shift(run: str) -> str:
    raw = base64.b64encode(run.encode("utf-16-be")).decode("ascii")
    return "&" + raw.rstrip("=").replace("/", ",") + "-"


def encode(name: str) -> str:
    out: list[str] = []
    run: list[str] = []
    for char in name:
        if _is_direct(char):
            if run:
                out.append(_shift("".join(run)))
                run = []
            out.append("&-" if char == "&" else char)
        else:
            run.append(char)
    if run:
        out.append(_shift("".join(run)))
    return "".join(out)


def decode(name: str) -> str:
    """The inverse of ``encode``; raises ValueError on a malformed name."""
    out: list[str] = []
    i = 0
    while i < len(name):
        char = name[i]
        if not _is_direct(char):
            raise ValueError(f"mailbox name has a character outside printable ASCII: {name!r}")
        if char != "&":
            out.append(char)
            i += 1
            continue
        end = name.find("-", i + 1)
        if end < 0:
            raise ValueError(f"unterminated &-sequence in mailbox name {name!r}")
        chunk = name[i + 1 : end]
        if not chunk:
            out.append("&")
        else:
            raw = chunk.replace(",", "/")
            try:
                data = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
                out.append(data.decode("utf-16-be"))
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise ValueError(f"bad &-sequence in mailbox name {name!r}") from exc
        i = end + 1
    return "".join(out)
