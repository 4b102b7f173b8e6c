"""`relayd test ADDRESS`: step by step against the real Postfix and Dovecot."""

from __future__ import annotations

import json

import pytest
from mailworld.world import MailWorld

from relayd.ops.checkup import DOTS

from .conftest import NewMailbox, RelayFor
from .ops_cli import relayd_cli

pytestmark = pytest.mark.integration


def test_implicit_port_configured_as_starttls_fails_then_names_what_works(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
    sender = new_mailbox("t")
    setup = relay_for(sender, port=mail_world.smtp_implicit_port, tls="starttls")
    result = relayd_cli(setup.config_path, "test", sender.address)
    print(result.stdout)
    assert result.returncode == 1
    assert "[ok]   DNS" in result.stdout and "[ok]   TCP" in result.stdout
    assert "[FAIL]" in result.stdout
    port = mail_world.smtp_implicit_port
    assert f"port {port} needs tls: implicit" in result.stdout
    assert "certificate subject" in result.stdout
    assert sender.password not in result.stdout + result.stderr
    assert f"password {DOTS} (file:" in result.stdout


def test_everything_passes_with_a_test_message_and_imap(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
    sender, rcpt = new_mailbox("t"), new_mailbox("rcpt")
    setup = relay_for(sender)
    setup.config["tenants"]["t"]["imap"] = {
        "host": "127.0.0.1",
        "port": mail_world.imaps_port,
        "tls": "implicit",
        "ca_file": str(mail_world.pki.ca_cert),
    }
    setup.rewrite_config()
    result = relayd_cli(setup.config_path, "test", sender.address, "--send-to", rcpt.address)
    print(result.stdout, result.stderr)
    assert result.returncode == 0
    out = result.stdout
    assert "TLSv1." in out and "certificate subject" in out and "AUTH" in out
    assert f"[ok]   login  as {sender.address}" in out
    assert "[ok]   send" in out and "[ok]   Sent" in out
    assert "all steps passed" in out
    [got] = mail_world.wait_for_messages(rcpt.name, 1)
    assert b"Subject: relayd test message" in got
    assert sender.password not in out + result.stderr


def test_wrong_password_fails_with_a_hint(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
    sender = new_mailbox("t")
    wrong = "a-very-long-wrong-password-that-must-not-show"
    setup = relay_for(sender, password=wrong)
    result = relayd_cli(setup.config_path, "test", sender.address)
    print(result.stdout)
    assert result.returncode == 1
    assert "[FAIL] login" in result.stdout and "535" in result.stdout
    assert "hint:" in result.stdout
    assert wrong not in result.stdout + result.stderr
    assert DOTS in result.stdout


def test_json_report_lists_each_step_and_a_missing_sent_folder(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
    sender = new_mailbox("t")
    setup = relay_for(sender)
    setup.config["tenants"]["t"]["imap"] = {
        "host": "127.0.0.1",
        "port": mail_world.imaps_port,
        "tls": "implicit",
        "ca_file": str(mail_world.pki.ca_cert),
        "sent_folder": "Sent Elsewhere",
    }
    setup.rewrite_config()
    result = relayd_cli(setup.config_path, "test", sender.address, "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)  # one document, nothing else on stdout
    assert report["account"] == sender.address and report["ok"] is False
    steps = {s["step"]: s for s in report["steps"]}
    for passed in ("DNS", "TCP", "TLS", "EHLO", "login"):
        assert steps[passed]["ok"] is True, steps[passed]
    assert steps["Sent"]["ok"] is False
    assert "no folder 'Sent Elsewhere'" in str(steps["Sent"]["detail"])
    assert sender.password not in result.stdout + result.stderr
