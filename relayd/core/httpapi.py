"""What an HTTP send API's answer means: Graph ``sendMail`` and Gmail ``messages.send``
replies mapped onto the reply vocabulary of ``relayd.core.outcome``. Pure: no I/O.

The APIs answer with HTTP status codes and a JSON error (Graph:
``{"error": {"code", "message"}}``; Google: ``{"error": {"code", "message", "errors":
[{"reason"}], "status"}}``). Each is turned into the SMTP-shaped ``Reply`` (or ``Failure``)
that means the same, so the scheduler's retry, bounce, pause and throttle rules apply
unchanged:

======================  =========================================  ===========================
HTTP answer             meaning                                    mapped to
======================  =========================================  ===========================
202 (Graph), 200+id     accepted: the provider sends it            250 2.0.0 → delivered
401                     token refused (RFC 6750 §3.1)              refresh once, retry once;
                                                                   again: 535 5.7.8 → held
403 / 404 mailbox       permission missing, insufficient scope,    Failure PERMISSION → paused
                        mailbox not enabled for REST               at once, with the fix
403 rate limits         Gmail ``userRateLimitExceeded`` etc.       as 429
400                     invalid recipient / MIME / header          550 5.1.1 or 554 5.6.0 →
                                                                   bounced, provider's text
413                     request larger than the API takes          552 5.3.4 → bounced
429, 503, 504           throttled / unavailable                    421 4.7.0 + Retry-After →
                                                                   the whole lane waits
other 5xx               provider trouble                           451 4.3.0 → deferred
other 4xx               a request the API will not take            554 5.0.0 → bounced
timeout, reset          no answer (may have been sent)             Failure → deferred
======================  =========================================  ===========================
"""

from __future__ import annotations

import email.utils
import enum
import json
from dataclasses import dataclass

from relayd.core.outcome import Failure, FailureKind, Phase, Reply

__all__ = [
    "Api",
    "ApiAnswer",
    "ApiError",
    "Refreshed",
    "map_answer",
    "parse_error",
    "retry_after_seconds",
]


class Api(enum.Enum):
    GRAPH = "Microsoft Graph"
    GMAIL = "Gmail API"


@dataclass(frozen=True)
class ApiError:
    """The JSON error body, as far as it could be read."""

    code: str = ""  # Graph error.code; Google errors[0].reason (else error.status)
    message: str = ""

    def __str__(self) -> str:
        text = f"{self.code}: {self.message}" if self.code else self.message
        return " ".join(text.split())[:400]  # one line, bounded: it goes into logs and DSNs


@dataclass(frozen=True)
class ApiAnswer:
    status: int
    error: ApiError
    retry_after: str | None = None  # the Retry-After header as sent


class Refreshed(enum.Enum):
    """Whether the token was already refreshed after a 401 in this attempt."""

    NOT_YET = "not-yet"
    ALREADY = "already"


def parse_error(body: bytes) -> ApiError:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return ApiError("", body[:200].decode("utf-8", "replace"))
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        return ApiError("", str(err or "")[:200])
    code = err.get("code")
    details = err.get("errors")
    if isinstance(details, list) and details and isinstance(details[0], dict):
        code = details[0].get("reason") or err.get("status") or code
    elif not isinstance(code, str):
        code = err.get("status") or ""
    return ApiError(str(code or ""), str(err.get("message") or ""))


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """RFC 9110 §10.2.3: delay-seconds or an HTTP-date; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


# Gmail answers some rate limits with 403 (Gmail API "Resolve errors": usageLimits).
_GOOGLE_RATE_REASONS = frozenset(
    {"userRateLimitExceeded", "rateLimitExceeded", "dailyLimitExceeded", "quotaExceeded"}
)
_THROTTLE_STATUSES = frozenset({429, 503, 504})
# Graph error codes of a 400 that name a recipient; everything else in a 400 is the message.
_RECIPIENT_CODES = frozenset({"ErrorInvalidRecipients", "invalidArgument"})


def _permission_fix(api: Api, error: ApiError, app_only: bool) -> str:
    if api is Api.GRAPH:
        if error.code == "MailboxNotEnabledForRESTAPI" or "REST" in error.message:
            return (
                "the mailbox is not enabled for the Graph REST API (an on-premises or "
                "unlicensed mailbox): move it to Exchange Online or give it a licence, or "
                "use transport: smtp"
            )
        if app_only:
            return (
                "grant the app the Microsoft Graph application permission Mail.Send with "
                "admin consent (Entra admin center > App registrations > API permissions), "
                "and check any application access policy that limits it to some mailboxes"
            )
        return (
            "the consent lacks the delegated Graph permission Mail.Send: add it to the app "
            "registration, then run `relayd auth ADDRESS` again for Graph"
        )
    if app_only:
        return (
            "allow the service account's client ID the scope "
            "https://www.googleapis.com/auth/gmail.send under domain-wide delegation (Google "
            "Admin console > Security > API controls), and enable the Gmail API for its project"
        )
    return (
        "the consent lacks the scope https://www.googleapis.com/auth/gmail.send (or the Gmail "
        "API is not enabled for the client's project): run `relayd auth ADDRESS` again"
    )


def map_answer(
    api: Api, answer: ApiAnswer, *, now: float, refreshed: Refreshed, app_only: bool
) -> Reply | Failure | None:
    """The ``Reply`` (at ``Phase.DATA`` unless it is about the login) or ``Failure`` the
    answer means; None for a 401 not yet retried: refresh the token and send again once."""
    status, error = answer.status, answer.error
    said = f"{api.value} {status}" + (f" {error}" if str(error) else "")
    if 200 <= status < 300:
        return Reply(250, f"2.0.0 accepted by {api.value} ({status})")
    if status == 401:
        if refreshed is Refreshed.NOT_YET:
            return None
        return Reply(535, f"5.7.8 token refused after a refresh: {said}")
    google_rate = api is Api.GMAIL and status == 403 and error.code in _GOOGLE_RATE_REASONS
    if status in _THROTTLE_STATUSES or google_rate:
        return Reply(
            421,
            f"4.7.0 throttled: {said}",
            retry_after=retry_after_seconds(answer.retry_after, now),
        )
    if status == 403 or (status == 404 and "MailboxNotEnabled" in error.code):
        fix = _permission_fix(api, error, app_only)
        return Failure(Phase.AUTH, FailureKind.PERMISSION, f"{said}; {fix}")
    if status == 400:
        if error.code in _RECIPIENT_CODES or "recipient" in error.message.lower():
            return Reply(550, f"5.1.1 {said}")
        return Reply(554, f"5.6.0 {said}")
    if status == 413:
        return Reply(552, f"5.3.4 message too large for {api.value}: {said}")
    if status >= 500:
        return Reply(451, f"4.3.0 {said}")
    return Reply(554, f"5.0.0 {said}")
