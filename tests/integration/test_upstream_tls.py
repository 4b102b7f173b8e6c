"""Upstream TLS is never opportunistic: no STARTTLS or a wrong-host certificate defers."""

from __future__ import annotations

import time

import pytest
from mailworld.world import MailWorld

from .conftest import NewMailbox, RelayFor
from .test_relay_delivery import message, send, spooled

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("port_attr", "tls", "expected"),
    [
        ("smtp_plain_port", "starttls", "does not offer STARTTLS"),
        ("smtp_wronghost_port", "implicit", "certificate not trusted"),
    ],
)
def test_insecure_upstream_gets_nothing_and_mail_is_deferred(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relay_for: RelayFor,
    port_attr: str,
    tls: str,
    expected: str,
) -> None:
    sender, rcpt = new_mailbox("tls"), new_mailbox("rcpt")
    port = getattr(mail_world, port_attr)
    setup = relay_for(sender, port=port, tls=tls)
    setup.relayd.start()
    postfix_log_before = len(mail_world.postfix_log())
    reply = send(
        setup.port,
        sender.address,
        [rcpt.address],
        message(sender.address, rcpt.address, "must not leave"),
        login=("app", setup.client_password),
    )
    queue_id = reply.rsplit(" ", 1)[1]
    log = setup.relayd.wait_for_log("status=deferred", count=2, timeout=30)
    assert expected in log
    time.sleep(1)
    assert mail_world.messages(rcpt.name) == []
    waiting = spooled(setup.dir / "state")
    assert queue_id in waiting["deferred"] + waiting["incoming"] + waiting["active"]
    # Postfix never saw AUTH or a MAIL FROM from relayd on that port.
    new_postfix = mail_world.postfix_log()[postfix_log_before:]
    assert "sasl_username=" + sender.address not in new_postfix
    assert f"from=<{sender.address}>" not in new_postfix
    assert setup.relayd.stop() == 0
