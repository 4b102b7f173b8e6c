"""A recipient Postfix refuses with 5xx: a DSN lands in the sender's own mailbox; and mail
that waits past spool.delay_warning: one "delayed" DSN there."""

from __future__ import annotations

import time

import pytest
from mailworld.world import MailWorld

from .conftest import NewMailbox, RelaydSetup, RelayFor
from .test_relay_delivery import message, send

pytestmark = pytest.mark.integration


def test_rejected_recipient_bounces_into_senders_mailbox(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
    sender, rcpt = new_mailbox("bouncer"), new_mailbox("rcpt")
    refused = "nobody@elsewhere.test"
    setup = relay_for(sender)
    setup.relayd.start()
    reply = send(
        setup.port,
        sender.address,
        [rcpt.address, refused],
        message(sender.address, rcpt.address, "partly refused"),
        login=("app", setup.client_password),
    )
    queue_id = reply.rsplit(" ", 1)[1]
    # Only the refused recipient bounces; the other one gets the message.
    [delivered] = mail_world.wait_for_messages(rcpt.name, 1)
    assert b"Subject: partly refused" in delivered
    [dsn] = mail_world.wait_for_messages(sender.name, 1, timeout=30)
    assert b"Content-Type: multipart/report; report-type=delivery-status" in dsn
    assert f"Final-Recipient: rfc822; {refused}".encode() in dsn
    assert b"Status: 5.7.1" in dsn
    assert b"Auto-Submitted: auto-replied" in dsn
    assert queue_id.encode() in dsn
    assert f"Final-Recipient: rfc822; {rcpt.address}".encode() not in dsn
    assert b"Subject: partly refused" in dsn  # the original headers are attached
    log = setup.relayd.log()
    assert f"to=<{refused}>" in log and "status=bounced" in log
    assert setup.relayd.stop() == 0


def test_mail_deferred_past_delay_warning_tells_the_sender_once(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
    """spool.delay_warning: one "delayed" DSN while the upstream is down, then the mail."""
    sender, rcpt = new_mailbox("delayed"), new_mailbox("rcpt")
    setup = relay_for(sender)
    setup.config["spool"]["delay_warning"] = "1s"
    setup.rewrite_config()
    mail_world.stop_postfix()
    try:
        setup.relayd.start()
        reply = send(
            setup.port,
            sender.address,
            [rcpt.address],
            message(sender.address, rcpt.address, "slow going"),
            login=("app", setup.client_password),
        )
        queue_id = reply.rsplit(" ", 1)[1]
        setup.relayd.wait_for_log("sender delay notification")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(deferrals(setup, queue_id)) < 3:
            time.sleep(0.2)
        assert len(deferrals(setup, queue_id)) >= 3  # tried again and again: still one warning
        mail_world.start_postfix()
        [delivered] = mail_world.wait_for_messages(rcpt.name, 1, timeout=30)
        [warning] = mail_world.wait_for_messages(sender.name, 1, timeout=30)
    finally:
        if not mail_world.postfix_running:
            mail_world.start_postfix()
    assert b"Subject: slow going" in delivered
    assert b"Subject: Delayed Mail (still being retried)" in warning
    assert f"Final-Recipient: rfc822; {rcpt.address}".encode() in warning
    assert b"Action: delayed" in warning and b"Will-Retry-Until: " in warning
    assert queue_id.encode() in warning
    time.sleep(1.0)
    assert len(mail_world.messages(sender.name)) == 1
    assert setup.relayd.log().count("sender delay notification") == 1
    assert setup.relayd.stop() == 0


def deferrals(setup: RelaydSetup, queue_id: str) -> list[str]:
    return [
        line
        for line in setup.relayd.log().splitlines()
        if queue_id in line and "status=deferred" in line
    ]
