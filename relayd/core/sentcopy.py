"""The filing step as policy: whether a message is filed over IMAP, where, and when to retry.

Pure: no I/O, the clock and the random unit come from the caller. Two kinds of filing share
the step (SPEC "Sent copy" and "DSNs"):

- a delivered message's **Sent copy**: ``sent_copy: auto`` skips the providers that file SMTP
  mail in Sent themselves (Gmail, Exchange Online: appending there makes
  duplicates), ``always``/``never`` say so, and an account without ``imap`` has nowhere to file;
- a **DSN** relayd wrote, filed in the sender's INBOX when the account has IMAP (so it works
  while SMTP is down and never lands in Sent).

The step keeps its own state in the spool: a ``FilingJob`` rides in the delivery state's
``extra`` under ``"filing"``. A message whose state carries one has been delivered (or is a
DSN): it must never go upstream again, which is how spool recovery tells it apart.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any

from relayd.config.model import AccountConfig, RetryPolicy, SentCopy
from relayd.config.presets import PRESETS
from relayd.core.envelope import DeliveryState
from relayd.core.retry import expired, next_delay

__all__ = [
    "FILING_KEY",
    "Filing",
    "FilingDecision",
    "FilingJob",
    "Folder",
    "awaits_filing",
    "dsn_filing",
    "job_of",
    "plan_after_failure",
    "sent_copy_filing",
    "with_job",
]

FILING_KEY = "filing"


class Filing(enum.Enum):
    NONE = "none"  # nothing to file
    IMAP = "imap"  # APPEND over IMAP
    CAPTURE = "capture"  # the capture provider's Maildir stands in for the mailbox


class Folder(enum.Enum):
    SENT = "sent"  # imap.sent_folder, else the \Sent special-use folder (RFC 6154)
    INBOX = "inbox"  # DSNs


def sent_copy_filing(account: AccountConfig) -> Filing:
    """Where a delivered message's Sent copy goes, if anywhere."""
    if account.sent_copy is SentCopy.NEVER:
        return Filing.NONE
    if account.is_capture:
        return Filing.CAPTURE
    if account.imap is None:
        return Filing.NONE  # custom provider without imap: no copy (SPEC presets table)
    if account.sent_copy is SentCopy.AUTO:
        if account.transport.is_http_api:
            # Graph's sendMail saves the MIME to Sent Items and Gmail's messages.send labels
            # it SENT: a copy of relayd's would be a duplicate.
            return Filing.NONE
        preset = PRESETS.get(account.provider)
        if preset is not None and preset.files_sent_copy_itself:
            return Filing.NONE
    return Filing.IMAP


def dsn_filing(account: AccountConfig) -> Filing:
    """SPEC "DSNs": into the INBOX over IMAP when the account has IMAP, else NONE (the caller
    sends the DSN through the account to itself over SMTP)."""
    if account.imap is None or account.is_capture:
        return Filing.NONE
    if account.transport.is_http_api:
        # Its OAuth tokens are for the send API alone (Graph's Mail.Send, Gmail's gmail.send),
        # which IMAP does not accept: the DSN goes through the API to the account itself.
        return Filing.NONE
    return Filing.IMAP


@dataclass(frozen=True)
class FilingJob:
    folder: Folder
    attempts: int = 0  # failed attempts so far
    next_attempt_at: float = 0.0
    # An APPEND was sent at least once: it may have reached the folder even if no reply came
    # back (a crash, a lost connection), so the folder is searched before appending again.
    append_issued: bool = False
    last_error: str = ""  # for `relayd status`

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": self.folder.value,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at,
            "append_issued": self.append_issued,
            "last_error": self.last_error,
        }

    @classmethod
    def from_dict(cls, data: Any) -> FilingJob:
        if not isinstance(data, dict):
            raise TypeError("filing job is not a JSON object")
        return cls(
            folder=Folder(data.get("folder", "sent")),
            attempts=int(data.get("attempts", 0)),
            next_attempt_at=float(data.get("next_attempt_at", 0.0)),
            append_issued=bool(data.get("append_issued", False)),
            last_error=str(data.get("last_error", "")),
        )

    def but(self, **changes: Any) -> FilingJob:
        return replace(self, **changes)


def awaits_filing(state: DeliveryState) -> bool:
    """The message is done upstream and waits only for its filing: never deliver it again."""
    return FILING_KEY in state.extra


def job_of(state: DeliveryState) -> FilingJob | None:
    raw = state.extra.get(FILING_KEY)
    if raw is None:
        return None
    try:
        return FilingJob.from_dict(raw)
    except (TypeError, ValueError):
        # Unreadable bookkeeping: assume the worst case, an APPEND that may have landed.
        return FilingJob(Folder.SENT, append_issued=True)


def with_job(state: DeliveryState, job: FilingJob) -> DeliveryState:
    return state.but(extra={**state.extra, FILING_KEY: job.to_dict()})


@dataclass(frozen=True)
class FilingDecision:
    give_up: bool
    job: FilingJob


def plan_after_failure(
    job: FilingJob,
    *,
    started_at: float,
    now: float,
    policy: RetryPolicy,
    random_unit: float,
    error: str,
    permanent: bool = False,
) -> FilingDecision:
    """After a failed filing attempt: retry on the spool's schedule, or give up.

    The lifetime is ``give_up_after`` counted from the delivery (``started_at``): the mail
    itself went out then, and a copy days late is still worth filing until that point.
    """
    attempts = job.attempts + 1
    failed = job.but(attempts=attempts, last_error=error)
    if permanent or expired(policy, started_at, now):
        return FilingDecision(True, failed)
    delay = next_delay(policy, attempts, random_unit)
    return FilingDecision(False, failed.but(next_attempt_at=now + delay))
