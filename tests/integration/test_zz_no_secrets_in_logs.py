"""No password, token or AUTH payload in any log the suite produced."""

from __future__ import annotations

import base64
import re
import smtplib
from pathlib import Path

import pytest
from mailworld.world import MailWorld

from .conftest import NewMailbox, RelaydSetupFactory, custom_tenant
from .relayd_proc import ALL_LOGS
from .test_relay_delivery import message, send

pytestmark = pytest.mark.integration


def _forms(secret: str) -> list[str]:
    raw = secret.encode()
    return [secret, base64.b64encode(raw).decode(), base64.b64encode(b"\0app\0" + raw).decode()]


def test_debug_logs_hold_no_secret(
    mail_world: MailWorld, new_mailbox: NewMailbox, relayd_setup: RelaydSetupFactory, tmp_path: Path
) -> None:
    sender, rcpt = new_mailbox("logs"), new_mailbox("rcpt")
    wrong_upstream = "Wr0ng-upstream-Pa55"
    setup = relayd_setup(
        {
            "ok": custom_tenant(
                mail_world,
                tmp_path / "secrets",
                sender,
                port=mail_world.smtp_starttls_port,
                tls="starttls",
            )
        },
        may_send_as=[sender.address, "other@example.test"],
    )
    other = new_mailbox("other")
    setup.config["tenants"]["bad"] = custom_tenant(
        mail_world,
        tmp_path / "secrets",
        other,
        port=mail_world.smtp_implicit_port,
        tls="implicit",
        password=wrong_upstream,
    )
    setup.config["clients"]["app"]["may_send_as"] = [sender.address, other.address]
    setup.rewrite_config()
    setup.relayd.start()
    # Good AUTH, bad AUTH (PLAIN and LOGIN), a delivery, and an upstream login refused.
    send(
        setup.port,
        sender.address,
        [rcpt.address],
        message(sender.address, rcpt.address, "logs"),
        login=("app", setup.client_password),
    )
    wrong_client = "not-the-client-Pa55"
    for mech in ("PLAIN", "LOGIN"):
        with smtplib.SMTP("127.0.0.1", setup.port, timeout=30) as smtp:
            smtp.ehlo()
            first = b"\0app\0" + wrong_client.encode() if mech == "PLAIN" else b"app"
            code, _ = smtp.docmd("AUTH", mech + " " + base64.b64encode(first).decode())
            if mech == "LOGIN":
                code, _ = smtp.docmd(base64.b64encode(wrong_client.encode()).decode())
            assert code == 535
    send(
        setup.port,
        other.address,
        [rcpt.address],
        message(other.address, rcpt.address, "bad login"),
        login=("app", setup.client_password),
    )
    mail_world.wait_for_messages(rcpt.name, 1)
    setup.relayd.wait_for_log("535", timeout=30)
    assert setup.relayd.stop() == 0
    assert "DEBUG" in setup.relayd.log()  # the grep is over debug-level output

    needles = [setup.client_password, wrong_client, sender.password, other.password, wrong_upstream]
    texts = {str(p): p.read_text(errors="replace") for p in ALL_LOGS if p.exists()}
    assert str(setup.relayd.log_path) in texts
    for path, text in texts.items():
        for secret in needles:
            for form in _forms(secret):
                assert form not in text, f"{path} contains a secret form of {secret[:3]}…"
        assert not re.search(r"AUTH (PLAIN|LOGIN) [A-Za-z0-9+/=]{8,}", text), path
