"""Throttle replies slow the account's lane down as a whole (relayd.core.throttle)."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator

import pytest
from mailworld.throttling import SessionLimitedUpstream
from mailworld.world import MailWorld

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


def test_432_beyond_two_sessions_converges_to_two_and_delivers_everything(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relay_for: RelayFor,
    limited: SessionLimitedUpstream,
) -> None:
    sender, rcpt = new_mailbox("throttled"), new_mailbox("rcpt")
    setup = relay_for(sender, port=limited.port, tls="none")  # limits: 3 connections
    setup.relayd.start()
    count = 100
    with smtplib.SMTP("127.0.0.1", setup.port, timeout=30) as smtp:
        smtp.login("app", setup.client_password)
        for i in range(count):
            smtp.sendmail(
                sender.address,
                [rcpt.address],
                message(sender.address, rcpt.address, f"throttled {i}"),
            )
    got = mail_world.wait_for_messages(rcpt.name, count, timeout=90)
    assert len(got) == count and limited.delivered == count
    time.sleep(0.5)
    print(
        f"432 replies: {limited.refusals}; sessions: {limited.sessions}; most open: "
        f"{limited.most_open}, after the first 432: {limited.most_open_after_refusal}"
    )
    assert limited.refusals >= 1  # relayd did try its 3 connections first
    assert limited.most_open_after_refusal <= 2  # then it converged to the provider's 2
    # Each 432 takes a connection away and pauses the lane: a handful in all, not one per
    # message that would otherwise have gone out on a third connection.
    assert limited.refusals <= 2
    log = setup.relayd.log()
    assert "throttled by the provider" in log
