"""What an upstream reply or failure means for a message: pure classification.

SPEC "Delivery": delivered · deferred (4xx, network, TLS, timeout, token endpoint down) ·
bounced (5xx for a recipient or the message) · held (credentials refused). The tables are
here, in one place, so that the transport never decides policy and tests need no server.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

__all__ = [
    "Failure",
    "FailureKind",
    "Phase",
    "Reply",
    "Verdict",
    "classify_failure",
    "classify_reply",
    "is_throttle",
]


class Phase(enum.Enum):
    CONNECT = "connect"
    TLS = "tls"
    EHLO = "ehlo"
    AUTH = "auth"
    TOKEN = "token"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    HELD = "held"


_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")


@dataclass(frozen=True)
class Reply:
    code: int
    text: str  # without the code; may start with an enhanced status code
    # Seconds the provider asked to wait before the next request (HTTP ``Retry-After``,
    # RFC 9110 §10.2.3); None when it said nothing. Only throttle replies carry one.
    retry_after: float | None = field(default=None, compare=False)

    @property
    def enhanced(self) -> str:
        """The RFC 3463 status code, or one derived from the basic code when absent."""
        m = _ENHANCED.match(self.text.strip())
        if m and m.group(1) == str(self.code)[0]:
            return m.group(0)
        return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(self.code // 100, "4.0.0")

    def __str__(self) -> str:
        return f"{self.code} {self.text}".strip()


class FailureKind(enum.Enum):
    NETWORK = "network"  # refused, reset, DNS
    TIMEOUT = "timeout"
    TLS = "tls"  # handshake or certificate verification failed
    NO_STARTTLS = "no-starttls"  # server does not offer STARTTLS: never fall back to plain
    PROTOCOL = "protocol"  # garbage, unexpected disconnect, a reply the step does not allow
    # No usable OAuth grant or connected app password: none was ever given (``relayd auth``
    # or the connect page not used yet), or the token endpoint refused it (RFC 6749 §5.2
    # invalid_grant). Said by relayd or the token endpoint, never by the mail server: the
    # mail is held, as for refused credentials.
    CONSENT = "consent"
    # The server offers no login mechanism relayd can use with the account's credentials: a
    # configuration problem no retry fixes, like a 504 to AUTH; held, never bounced.
    NO_MECHANISM = "no-mechanism"
    # An HTTP send API refused the account itself (HTTP 403: permission missing, mailbox not
    # enabled for the API): an administrator has to act, so the account is paused at once.
    PERMISSION = "permission"


@dataclass(frozen=True)
class Failure:
    """A failure that produced no SMTP reply to classify."""

    phase: Phase
    kind: FailureKind
    detail: str

    @property
    def enhanced(self) -> str:
        return "4.4.2" if self.kind in (FailureKind.NETWORK, FailureKind.TIMEOUT) else "4.7.0"

    def __str__(self) -> str:
        if self.kind is FailureKind.CONSENT:
            return f"no consent from the mailbox owner: {self.detail}"
        if self.kind is FailureKind.PERMISSION:
            return f"refused by the provider: {self.detail}"
        return f"{self.kind.value} during {self.phase.value}: {self.detail}"


# Credentials refused (SPEC "held"): generic 535 (RFC 4954), Gmail's 534 5.7.9 (app password
# required), Microsoft's 530 5.7.57 (not authenticated to send) and 535 5.7.139 (SMTP AUTH
# disabled for the tenant or mailbox). Retrying them only locks the mailbox; pause instead.
_CREDENTIAL_REFUSALS = {534, 535}


def is_credential_refusal(phase: Phase, reply: Reply) -> bool:
    if phase is Phase.AUTH and reply.code in _CREDENTIAL_REFUSALS:
        return True
    if phase is Phase.TOKEN and reply.code // 100 == 5:
        # The token endpoint refused the grant (RFC 6749 §5.2 invalid_grant: consent expired
        # or revoked; invalid_client): SPEC lists invalid_grant among the credential refusals.
        # An unreachable endpoint or a 5xx there is a Failure, never a Reply.
        return True
    if phase is Phase.AUTH and reply.code // 100 == 5:
        # 504 (mechanism) or 538 (encryption required) at AUTH: a configuration problem that
        # no retry fixes and that must not bounce mail either.
        return True
    # 530 5.7.57 arrives at MAIL FROM when the login did not take.
    return reply.code == 530 and reply.enhanced == "5.7.57"


def is_send_as_refusal(reply: Reply) -> bool:
    """Microsoft's 554 5.2.252 SendAsDenied: the sender may not use this mailbox (bounce, alert)."""
    return reply.enhanced == "5.2.252" or "sendasdenied" in reply.text.lower()


def classify_reply(phase: Phase, reply: Reply) -> Verdict:
    if 200 <= reply.code < 300 and phase is Phase.DATA:
        return Verdict.DELIVERED
    if 200 <= reply.code < 400:
        # A positive reply anywhere else is the answer to a step that should have gone
        # differently (e.g. 250 to AUTH where RFC 4954 §4 requires 235): the message was not
        # taken, so it waits — never counted as delivered.
        return Verdict.DEFERRED
    if is_credential_refusal(phase, reply):
        return Verdict.HELD
    if reply.code // 100 == 4:
        return Verdict.DEFERRED
    if phase in (Phase.CONNECT, Phase.EHLO, Phase.TLS):
        # A 5xx greeting or EHLO refusal is the server refusing us, not the message.
        return Verdict.DEFERRED
    return Verdict.BOUNCED


def classify_failure(failure: Failure) -> Verdict:
    # Network, TLS and timeouts never bounce and never pause: the mail waits (SPEC deferred).
    # A missing or refused grant is the credentials refused: held (SPEC "held": invalid_grant).
    if failure.kind in (FailureKind.CONSENT, FailureKind.NO_MECHANISM, FailureKind.PERMISSION):
        return Verdict.HELD
    return Verdict.DEFERRED


# Replies that mean "you are sending too much, too fast or on too many connections" rather
# than anything about this message: RFC 3463 class 4.7.x ("security or policy status") on
# 421/450/451/454 (Gmail's "421 4.7.0 Try again later", "454 4.7.0 Too many login attempts",
# "451 4.7.500 Server busy"), and Microsoft's "432 4.3.2 Concurrent connections limit
# exceeded" / "421 4.3.2 The maximum number of concurrent server connections has exceeded".
_THROTTLE_CODES = {421, 450, 451, 454}


def is_throttle(reply: Reply) -> bool:
    if reply.code == 432:
        return True
    if reply.code not in _THROTTLE_CODES:
        return False
    enhanced = reply.enhanced
    return enhanced.startswith("4.7.") or enhanced == "4.3.2"
