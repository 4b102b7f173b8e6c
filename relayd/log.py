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
import time
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
        fields = record.__dict__
        if "queue_id" not in fields:
            record.queue_id = "-"
        if "account" not in fields:
            record.account = "-"
        if not self._needles:
            return True
        redacted = record.getMessage()
        for needle in self._needles:
            if needle in redacted:
                redacted = redacted.replace(needle, "***")
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            for needle in self._needles:
                record.exc_text = record.exc_text.replace(needle, "***")
        # The formatted text replaces format and arguments, so the handler's formatter does
        # not format the message a second time.
        record.msg, record.args = redacted, None
        return True


redactor = SecretRedactor()


class _Formatter(logging.Formatter):
    """The standard format, with the date and time text made once per second: every
    delivery attempt logs a line, so the time is formatted hundreds of times a second."""

    def __init__(self, fmt: str) -> None:
        super().__init__(fmt)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


def configure_logging(level: str = "info", stream: object = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(_Formatter(_FORMAT))
    handler.addFilter(redactor)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)
