"""One delivery attempt of one message, over a reused session, turned into verdicts.

The scheduler hands in the account, the envelope, the recipients still pending and the
content; this module speaks to the provider (or the capture Maildir) and returns what
happened per recipient plus what it says about the account (login worked, credentials
refused, upstream unreachable). It decides nothing about queues.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from pathlib import Path

from relayd.config.model import AccountConfig
from relayd.core.lines import as_delivered
from relayd.core.outcome import (
    Failure,
    Phase,
    Reply,
    Verdict,
    classify_failure,
    classify_reply,
    is_send_as_refusal,
)
from relayd.core.states import RecipientResult
from relayd.maildir import CaptureMaildir
from relayd.upstream.dataphase import ContentSource
from relayd.upstream.transport import (
    DEFAULT_TIMEOUTS,
    AttemptError,
    CredentialSource,
    Timeouts,
    UpstreamSession,
)

__all__ = ["AccountSignal", "AttemptReport", "Deliverer"]


class AccountSignal(enum.Enum):
    LOGIN_OK = "login-ok"
    CREDENTIALS_REFUSED = "credentials-refused"
    CONNECTION_FAILED = "connection-failed"
    SEND_AS_DENIED = "send-as-denied"


@dataclass
class AttemptReport:
    results: list[RecipientResult]
    relay: str
    signal: AccountSignal | None = None
    detail: str = ""  # the reply or failure behind the signal
    sessions_opened: int = 0
    extra: dict[str, str] = field(default_factory=dict)


def _batches(recipients: tuple[str, ...], size: int) -> list[tuple[str, ...]]:
    if size <= 0 or len(recipients) <= size:
        return [recipients]
    return [recipients[i : i + size] for i in range(0, len(recipients), size)]


def _result(recipient: str, phase: Phase, outcome: Reply | Failure) -> RecipientResult:
    if isinstance(outcome, Reply):
        verdict = classify_reply(phase, outcome)
        return RecipientResult(recipient, verdict, outcome.enhanced, str(outcome))
    return RecipientResult(recipient, classify_failure(outcome), outcome.enhanced, str(outcome))


class Deliverer:
    def __init__(
        self,
        *,
        helo_name: str,
        credentials: CredentialSource,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        fsync: bool = True,
    ) -> None:
        self.helo_name = helo_name
        self.credentials = credentials
        self.timeouts = timeouts
        self.fsync = fsync

    def new_session(self, account: AccountConfig) -> UpstreamSession:
        return UpstreamSession(
            account, helo_name=self.helo_name, credentials=self.credentials, timeouts=self.timeouts
        )

    async def attempt(
        self,
        account: AccountConfig,
        sender: str,
        pending: tuple[str, ...],
        content: bytes | ContentSource,
        session: UpstreamSession | None,
        *,
        smtputf8: bool = False,
    ) -> tuple[AttemptReport, UpstreamSession | None]:
        if account.is_capture:
            return await self._capture(account, sender, pending, content), None
        report = AttemptReport(results=[], relay="")
        reused = session is not None and session.is_open
        if session is None or not session.is_open:
            session = self.new_session(account)
        report.relay = session.relay
        for try_number in (1, 2):
            try:
                if not session.is_open:
                    report.sessions_opened += 1
                    await session.open()
                    report.signal = AccountSignal.LOGIN_OK
                results: list[RecipientResult] = []
                for batch in _batches(pending, account.limits.max_recipients):
                    tx = await session.send(sender, batch, content, smtputf8=smtputf8)
                    for rcpt in batch:
                        phase, reply = tx.replies[rcpt]
                        results.append(_result(rcpt, phase, reply))
                        if phase is not Phase.RCPT and is_send_as_refusal(reply):
                            report.signal = AccountSignal.SEND_AS_DENIED
                            report.detail = str(reply)
                        if phase is Phase.MAIL and classify_reply(phase, reply) is Verdict.HELD:
                            report.signal = AccountSignal.CREDENTIALS_REFUSED
                            report.detail = str(reply)
                report.results = results
                return report, session if session.is_open else None
            except AttemptError as err:
                if reused and try_number == 1 and isinstance(err.outcome, Failure):
                    # A kept connection the server closed while idle: reconnect once.
                    session = self.new_session(account)
                    continue
                report.results = [_result(r, err.phase, err.outcome) for r in pending]
                if any(r.verdict is Verdict.HELD for r in report.results):
                    report.signal = AccountSignal.CREDENTIALS_REFUSED
                elif isinstance(err.outcome, Failure) or err.phase in (Phase.CONNECT, Phase.EHLO):
                    report.signal = AccountSignal.CONNECTION_FAILED
                report.detail = str(err.outcome)
                session.close()
                return report, None
        raise AssertionError("unreachable")

    async def _capture(
        self,
        account: AccountConfig,
        sender: str,
        pending: tuple[str, ...],
        content: bytes | ContentSource,
    ) -> AttemptReport:
        assert account.capture_path is not None
        maildir = CaptureMaildir(account.capture_path, fsync=self.fsync)

        def deliver() -> Path:
            data = content if isinstance(content, bytes) else b"".join(content.iter_content())
            # As an SMTP upstream would receive it, so its Sent copy is the same bytes.
            return maildir.deliver(sender, pending, as_delivered(data))

        path = await asyncio.to_thread(deliver)
        # Its Sent copy (the Maildir's .Sent) is filed by the filing stage, relayd.sync.filing.
        ok = Reply(250, f"2.0.0 captured as {path.name}")
        return AttemptReport(
            results=[RecipientResult(r, Verdict.DELIVERED, "2.0.0", str(ok)) for r in pending],
            relay=f"capture:{account.capture_path}",
            signal=AccountSignal.LOGIN_OK,
        )
