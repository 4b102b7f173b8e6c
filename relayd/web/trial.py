""" "Test & connect" for the connect page: an app password is tried live before it is saved,
and a connected account can send its owner a test message.

Both go through the daemon's own session code (``relayd.upstream.smtp.SmtpSession`` and
``relayd.sync.imap.ImapSession``; the test message through the account's own transport,
which may be a send API), so a password that passes here is one the daemon can log
in with, and a provider's refusal is shown as the provider said it, with relayd's hint for
the code (``relayd.core.hints``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid

from relayd.config.model import AccountConfig
from relayd.core.hints import hint_for
from relayd.sync.imap import ImapError, ImapSession, ImapTimeouts
from relayd.upstream.credentials import Credential, CredentialSource, Mechanism
from relayd.upstream.dataphase import BytesContent
from relayd.upstream.delivery import UpstreamDeliverer
from relayd.upstream.smtp import SmtpSession
from relayd.upstream.transport import AttemptError, Timeouts

__all__ = ["TrialResult", "send_test_message", "try_password"]

# The owner waits in front of the page: a little shorter than the daemon's own limits.
TIMEOUTS = Timeouts(connect=20.0, command=20.0, data=60.0)
IMAP_TIMEOUTS = ImapTimeouts(connect=20.0, command=20.0, append=60.0)


@dataclass(frozen=True)
class TrialResult:
    ok: bool
    step: str  # "SMTP", "IMAP" or "send"
    said: str = ""  # the provider's reply, or what went wrong
    hint: str = ""


class _Candidate(CredentialSource):
    """The password typed into the form, and only that."""

    def __init__(self, password: str) -> None:
        self._password = password

    async def obtain(self, account: AccountConfig) -> Credential:
        return Credential(account.username, self._password, Mechanism.PASSWORD)

    def rejected(self, account: AccountConfig, credential: Credential) -> None:
        del account, credential


def _failed(step: str, said: str) -> TrialResult:
    return TrialResult(False, step, said, hint_for(said) or "")


async def try_password(account: AccountConfig, password: str, helo_name: str) -> TrialResult:
    """SMTP login with ``password``, then IMAP login when the account has IMAP. Nothing is
    sent, nothing is stored."""
    if account.smtp is None:
        return TrialResult(False, "SMTP", "this account delivers nowhere (capture)")
    session = SmtpSession(
        account, helo_name=helo_name, credentials=_Candidate(password), timeouts=TIMEOUTS
    )
    try:
        await session.open()
    except AttemptError as err:
        return _failed("SMTP", str(err.outcome))
    await session.quit()
    if account.imap is None:
        return TrialResult(True, "SMTP")
    imap = account.imap
    if imap.password is None:
        # The IMAP login is the SMTP one unless imap.password says otherwise (SPEC).
        account = replace(account, password=None, connect_password=True)

    async def candidate(_account: AccountConfig) -> str:
        return password

    mailbox = ImapSession(account, password_source=candidate, timeouts=IMAP_TIMEOUTS)
    try:
        await mailbox.open()
    except ImapError as exc:
        return _failed("IMAP", exc.detail)
    await mailbox.logout()
    return TrialResult(True, "IMAP")


def test_message(account: AccountConfig, helo_name: str) -> bytes:
    now = format_datetime(datetime.now(UTC))
    return (
        f"From: <{account.address}>\r\nTo: <{account.address}>\r\n"
        "Subject: relayd test message\r\n"
        f"Date: {now}\r\nMessage-ID: {make_msgid('relayd-test', helo_name)}\r\n"
        "Auto-Submitted: auto-generated\r\n\r\n"
        f"This message was sent through {account.address} by relayd on {helo_name},\r\n"
        "at the request of its connect page.\r\n"
    ).encode()


async def send_test_message(
    account: AccountConfig, credentials: CredentialSource, helo_name: str
) -> TrialResult:
    """A message from the account to itself, through the account (the daemon's credentials:
    the stored password or tokens)."""
    if account.smtp is None:
        return TrialResult(False, "send", "this account delivers nowhere (capture)")
    # Through the account's own transport: SMTP, or the Graph / Gmail send API.
    deliverer = UpstreamDeliverer(helo_name=helo_name, credentials=credentials, timeouts=TIMEOUTS)
    session = deliverer.new_transport(account)
    started = time.monotonic()
    try:
        await session.open()
        result = await session.send(
            account.address, (account.address,), BytesContent(test_message(account, helo_name))
        )
    except AttemptError as err:
        session.close()
        return _failed("send", str(err.outcome))
    finally:
        await deliverer.aclose()
    await session.quit()
    _phase, reply = result.replies.get(account.address, (None, None))
    if reply is not None and reply.code != 250:
        return _failed("send", str(reply))
    took = time.monotonic() - started
    return TrialResult(True, "send", f"accepted by {session.relay} in {took:.1f} s")
