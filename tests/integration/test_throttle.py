"""Throttle replies slow the account's lane down as a whole (relayd.core.throttle)."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator

import pytest
from mailworld.throttling import SessionLimitedUpstream
from mailworld.world import MailWorld

from relayd.queue.lanes import IDLE_SESSION_SECONDS

from .conftest import NewMailbox, RelayFor
from .test_relay_delivery import message

pytestmark = pytest.mark.integration


@pytest.fixture
def limited(mail_world: MailWorld) -> Iterator[SessionLimitedUpstream]:
    upstream = SessionLimitedUpstream(mail_world.lmtp_port, max_sessions=2)
    upstream.start()
    try:
        yield upstream
    finally:
        upstream.stop()


def _send_burst(port: int, password: str, sender: str, rcpt: str, first: int, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.login("app", password)
        for i in range(first, first + count):
            smtp.sendmail(sender, [rcpt], message(sender, rcpt, f"throttled {i}"))


def _delivered(limited: SessionLimitedUpstream, count: int) -> None:
    # The proxy counts a message once LMTP has taken it, a moment after it shows in the
    # mailbox.
    deadline = time.monotonic() + 10
    while limited.delivered < count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert limited.delivered == count


def test_432_beyond_two_sessions_converges_to_two_and_delivers_everything(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relay_for: RelayFor,
    limited: SessionLimitedUpstream,
) -> None:
    sender, rcpt = new_mailbox("throttled"), new_mailbox("rcpt")
    setup = relay_for(sender, port=limited.port, tls="none")  # limits: 3 connections
    setup.relayd.start()
    # A burst: relayd opens its 3 connections, the third hears 432.
    _send_burst(setup.port, setup.client_password, sender.address, rcpt.address, 0, 60)
    mail_world.wait_for_messages(rcpt.name, 60, timeout=90)
    _delivered(limited, 60)
    assert limited.refusals >= 1  # relayd did try its 3 connections first
    # The sessions it kept go idle and are closed; the next burst needs new ones, and
    # relayd opens no more than the 2 the provider allows.
    time.sleep(IDLE_SESSION_SECONDS + 1)
    before = limited.sessions
    _send_burst(setup.port, setup.client_password, sender.address, rcpt.address, 60, 40)
    got = mail_world.wait_for_messages(rcpt.name, 100, timeout=90)
    _delivered(limited, 100)
    assert len(got) == 100
    print(
        f"432 replies: {limited.refusals}; sessions: {limited.sessions}; most working: "
        f"{limited.most_open}; most wanted at once after the first 432: "
        f"{limited.most_open_after_refusal}"
    )
    assert limited.sessions > before  # the second burst came on new sessions
    assert limited.most_open_after_refusal <= 2  # converged to the provider's 2
    # Each 432 takes a connection away and pauses the lane: a handful in all, not one per
    # message that would otherwise have gone out on a third connection.
    assert limited.refusals <= 2
    log = setup.relayd.log()
    assert "throttled by the provider" in log
