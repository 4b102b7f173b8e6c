"""A recipient Postfix refuses with 5xx: a DSN lands in the sender's own mailbox."""

from __future__ import annotations

import pytest
from test_relay_delivery import message, send

pytestmark = pytest.mark.integration


def test_rejected_recipient_bounces_into_senders_mailbox(mail_world, new_mailbox, relay_for):
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
