"""An upstream that hangs or keeps failing never slows another account's mail."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from mailworld.world import MailWorld

from .conftest import NewMailbox, RelaydSetupFactory, custom_tenant
from .test_relay_delivery import message, send

pytestmark = pytest.mark.integration


def test_stalled_upstream_does_not_delay_other_accounts(
    mail_world: MailWorld, new_mailbox: NewMailbox, relayd_setup: RelaydSetupFactory, tmp_path: Path
) -> None:
    stuck, healthy, rcpt = new_mailbox("stuck"), new_mailbox("healthy"), new_mailbox("rcpt")
    # A listener that completes the TCP handshake and then never says a word (no greeting,
    # no TLS): relayd's attempt for `stuck` can only end by its own timeout.
    staller = socket.socket()
    staller.bind(("127.0.0.1", 0))
    staller.listen(16)
    try:
        secrets_dir = tmp_path / "secrets"
        setup = relayd_setup(
            {
                "stuck": custom_tenant(
                    mail_world, secrets_dir, stuck, port=staller.getsockname()[1], tls="implicit"
                ),
                "healthy": custom_tenant(
                    mail_world,
                    secrets_dir,
                    healthy,
                    port=mail_world.smtp_starttls_port,
                    tls="starttls",
                ),
            },
            may_send_as=[stuck.address, healthy.address],
        )
        setup.relayd.start()
        login = ("app", setup.client_password)
        for i in range(3):
            send(
                setup.port,
                stuck.address,
                [rcpt.address],
                message(stuck.address, rcpt.address, f"stuck {i}"),
                login=login,
            )
        started = time.monotonic()
        send(
            setup.port,
            healthy.address,
            [rcpt.address],
            message(healthy.address, rcpt.address, "healthy"),
            login=login,
        )
        [raw] = mail_world.wait_for_messages(rcpt.name, 1, timeout=15)
        elapsed = time.monotonic() - started
        assert b"Subject: healthy" in raw
        # The stalled attempts are still hanging (30 s connect timeout) — no attempt line for
        # `stuck` yet — and the healthy account's message did not wait for them.
        assert elapsed < 15
        assert stuck.address not in [
            ln.split()[3] for ln in setup.relayd.log().splitlines() if "status=" in ln
        ]
    finally:
        staller.close()
