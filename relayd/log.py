"""Logging: one line per event with queue id and account, and no secret ever printed.

Every handler passes through ``SecretRedactor``: the values of all configured secrets (and
their base64 forms, as they would appear in an AUTH exchange) are replaced by ``***`` before a
line is written. The libraries that can log AUTH payloads (aiosmtpd's ``mail.log``,
aiosmtplib, aioimaplib — see notes on their debug output) are kept at WARNING.
"""

from __future__ import annotations

import base64
import logging
import sys
from collections.abc import Iterable

__all__ = ["SecretRedactor", "configure_logging", "redactor"]

# Loggers of libraries that put protocol lines, AUTH payloads included, into DEBUG/INFO.
_QUIET_LIBRARIES = (
    "mail.log",
    "aiosmtplib",
    "aioimaplib",
    "msal",
    "urllib3",
    "asyncio",
    "google",
    "google_auth_oauthlib",
    "requests_oauthlib",
    "oauthlib",
)

_MAX_LEARNT = 256

_FORMAT = "%(asctime)s %(levelname)s %(queue_id)s %(account)s %(name)s: %(message)s"


class SecretRedactor(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self._needles: list[str] = []
        self._configured: set[str] = set()
        # Secrets learnt at run time (OAuth tokens): kept across config reloads; the oldest
        # are dropped past a bound (an expired token is no longer worth a lookup per line).
        self._learnt: dict[str, None] = {}

    def set_secrets(self, secrets: Iterable[str]) -> None:
        self._configured = set(secrets)
        self._rebuild()

    def add_secret(self, secret: str) -> None:
        if secret in self._learnt:
            return
        self._learnt[secret] = None
        while len(self._learnt) > _MAX_LEARNT:
            del self._learnt[next(iter(self._learnt))]
        self._rebuild()

    def _rebuild(self) -> None:
        needles: set[str] = set()
        for secret in (*self._configured, *self._learnt):
            if len(secret) < 4:
                continue  # too short to redact without mangling ordinary text
            needles.add(secret)
            raw = secret.encode()
            needles.add(base64.b64encode(raw).decode())
        # Longest first, so a secret that contains another is replaced whole.
        self._needles = sorted(needles, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        for attr in ("queue_id", "account"):
            if not hasattr(record, attr):
                setattr(record, attr, "-")
        if not self._needles:
            return True
        message = record.getMessage()
        redacted = message
        for needle in self._needles:
            if needle in redacted:
                redacted = redacted.replace(needle, "***")
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            for needle in self._needles:
                record.exc_text = record.exc_text.replace(needle, "***")
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


redactor = SecretRedactor()


def configure_logging(level: str = "info", stream: object = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter(_FORMAT))
    handler.addFilter(redactor)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
