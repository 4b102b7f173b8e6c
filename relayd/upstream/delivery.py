"""One delivery attempt of one message, over a reused transport, turned into verdicts.

The scheduler hands in the account, the envelope's sender, the recipients still pending and
the content; ``UpstreamDeliverer`` speaks to the provider through the account's
``Transport`` and returns what happened per recipient plus what it says about the account
(login worked, credentials refused, upstream unreachable, sender refused), with the reply or
failure behind it kept typed. It decides nothing about queues.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from relayd.config.model import AccountConfig
from relayd.core.outcome import (
    Failure,
    Phase,
    Reply,
    Verdict,
    classify_failure,
    classify_reply,
    is_send_as_refusal,
    is_throttle,
)
from relayd.core.states import RecipientResult
from relayd.upstream.capture import CaptureTransport
from relayd.upstream.credentials import CredentialSource
from relayd.upstream.dataphase import ContentSource
from relayd.upstream.smtp import SmtpSession
from relayd.upstream.transport import DEFAULT_TIMEOUTS, AttemptError, Timeouts, Transport

if TYPE_CHECKING:
    from relayd.upstream.httpapi import ApiClients

__all__ = ["AccountSignal", "AttemptReport", "Deliverer", "UpstreamDeliverer"]


class AccountSignal(enum.Enum):
    LOGIN_OK = "login-ok"
    CREDENTIALS_REFUSED = "credentials-refused"
    CONNECTION_FAILED = "connection-failed"
    SEND_AS_DENIED = "send-as-denied"
    THROTTLED = "throttled"  # the provider asked to slow down (relayd.core.throttle)


@dataclass
class AttemptReport:
    results: list[RecipientResult]
    relay: str
    signal: AccountSignal | None = None
    cause: Reply | Failure | None = None  # the reply or failure behind the signal
    sessions_opened: int = 0

    @property
    def detail(self) -> str:
        return str(self.cause) if self.cause is not None else ""


class Deliverer(Protocol):
    """What the scheduler needs from the upstream side."""

    def new_transport(self, account: AccountConfig) -> Transport:
        """A transport for the account, not yet open (the paused account's probe uses it)."""
        ...

    async def attempt(
        self,
        account: AccountConfig,
        sender: str,
        pending: tuple[str, ...],
        content: ContentSource,
        transport: Transport | None,
        *,
        smtputf8: bool = False,
    ) -> tuple[AttemptReport, Transport | None]:
        """Deliver to ``pending``; returns the report and the transport to keep, if open."""
        ...


def _batches(recipients: tuple[str, ...], size: int) -> list[tuple[str, ...]]:
    if size <= 0 or len(recipients) <= size:
        return [recipients]
    return [recipients[i : i + size] for i in range(0, len(recipients), size)]


def _result(recipient: str, phase: Phase, outcome: Reply | Failure) -> RecipientResult:
    if isinstance(outcome, Reply):
        verdict = classify_reply(phase, outcome)
        return RecipientResult(recipient, verdict, outcome.enhanced, str(outcome))
    return RecipientResult(recipient, classify_failure(outcome), outcome.enhanced, str(outcome))


class UpstreamDeliverer:
    """The daemon's ``Deliverer``: SMTP sessions, or the capture Maildir."""

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
        self._api_clients: ApiClients | None = None

    def new_transport(self, account: AccountConfig) -> Transport:
        if account.is_capture:
            return CaptureTransport(account, fsync=self.fsync)
        if account.transport.is_http_api:
            # Imported here: the HTTP client is loaded only where an account uses an API.
            from relayd.upstream.httpapi import ApiClients, HttpApiTransport

            if self._api_clients is None:
                self._api_clients = ApiClients(self.timeouts)
            return HttpApiTransport(
                account,
                credentials=self.credentials,
                clients=self._api_clients,
                timeouts=self.timeouts,
            )
        return SmtpSession(
            account, helo_name=self.helo_name, credentials=self.credentials, timeouts=self.timeouts
        )

    async def aclose(self) -> None:
        """Close the pooled HTTP clients of the send APIs, if any were made."""
        if self._api_clients is not None:
            await self._api_clients.close()

    async def attempt(
        self,
        account: AccountConfig,
        sender: str,
        pending: tuple[str, ...],
        content: ContentSource,
        transport: Transport | None,
        *,
        smtputf8: bool = False,
    ) -> tuple[AttemptReport, Transport | None]:
        reused = transport is not None and transport.is_open
        if transport is None or not transport.is_open:
            transport = self.new_transport(account)
        report = AttemptReport(results=[], relay=transport.relay)
        # SPEC limits.max_recipients: at most that many recipients per transaction. What is
        # done stays done: a later batch that fails fails for its own recipients only.
        # An HTTP send API takes the message once for all its recipients: it delivers to the
        # header fields, which name them all (relayd.core.apienvelope), so a split would
        # only send it twice.
        size = 0 if account.transport.is_http_api else account.limits.max_recipients
        batches = _batches(pending, size)
        for try_number in (1, 2):
            try:
                if not transport.is_open:
                    report.sessions_opened += 1
                    await transport.open()
                    report.signal = AccountSignal.LOGIN_OK
                while batches:
                    batch = batches[0]
                    tx = await transport.send(sender, batch, content, smtputf8=smtputf8)
                    batches.pop(0)
                    for rcpt in batch:
                        phase, reply = tx.replies[rcpt]
                        report.results.append(_result(rcpt, phase, reply))
                        if phase is not Phase.RCPT and is_send_as_refusal(reply):
                            report.signal = AccountSignal.SEND_AS_DENIED
                            report.cause = reply
                        if phase is Phase.MAIL and classify_reply(phase, reply) is Verdict.HELD:
                            report.signal = AccountSignal.CREDENTIALS_REFUSED
                            report.cause = reply
                        elif is_throttle(reply):
                            report.signal = AccountSignal.THROTTLED
                            report.cause = reply
                    if report.signal is AccountSignal.THROTTLED:
                        # Slow down at once: this connection goes, the rest waits.
                        transport.close()
                        assert isinstance(report.cause, Reply)
                        for rest in batches:
                            report.results += [_result(r, Phase.MAIL, report.cause) for r in rest]
                        batches = []
                return report, transport if transport.is_open else None
            except AttemptError as err:
                if (
                    reused
                    and try_number == 1
                    and not report.results
                    and isinstance(err.outcome, Failure)
                ):
                    # A kept connection the server closed while idle: reconnect once.
                    transport = self.new_transport(account)
                    continue
                failed = [_result(r, err.phase, err.outcome) for b in batches for r in b]
                report.results += failed
                if isinstance(err.outcome, Reply) and is_throttle(err.outcome):
                    # 421 at the greeting, 454 at AUTH, 432 anywhere: slow down, and a
                    # login throttled is no login refused (the refusal streak stands).
                    report.signal = AccountSignal.THROTTLED
                elif any(r.verdict is Verdict.HELD for r in failed):
                    report.signal = AccountSignal.CREDENTIALS_REFUSED
                elif isinstance(err.outcome, Failure) or err.phase in (Phase.CONNECT, Phase.EHLO):
                    report.signal = AccountSignal.CONNECTION_FAILED
                report.cause = err.outcome
                transport.close()
                return report, None
        raise AssertionError("unreachable")
