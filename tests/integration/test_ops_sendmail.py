"""`relayd sendmail` / `relayd-sendmail`: over submit.sock with the daemon up, through the
maildrop with it down (delivered once it starts), with sendmail's exit codes."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from mailworld.world import MailWorld

from .conftest import Mailbox, NewMailbox, RelaydSetup, RelayFor
from .ops_cli import relayd_cli, wait_until

pytestmark = pytest.mark.integration

PRINTF = b"To: %s\nSubject: %s\n\nbody\n"


def _setup(relay_for: RelayFor, sender: Mailbox) -> RelaydSetup:
    setup = relay_for(sender)
    # The tests run as root: root is the Unix user that sendmail submits as.
    setup.config["clients"]["local"] = {"unix_users": ["root"], "may_send_as": [sender.address]}
    setup.rewrite_config()
    return setup


def test_sendmail_t_delivers_with_the_daemon_running_and_stopped(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
    sender, rcpt, hidden = new_mailbox("sm"), new_mailbox("x"), new_mailbox("bcc")
    setup = _setup(relay_for, sender)
    setup.relayd.start()
    up = PRINTF % (rcpt.address.encode(), b"while running")
    up = up.replace(b"\nSubject", b"\nBcc: " + hidden.address.encode() + b"\nSubject")
    result = relayd_cli(setup.config_path, "sendmail", "-t", "-f", sender.address, stdin=up)
    assert result.returncode == 0, result.stderr
    [got] = mail_world.wait_for_messages(rcpt.name, 1)
    [got_bcc] = mail_world.wait_for_messages(hidden.name, 1)
    assert b"Subject: while running" in got and b"Bcc:" not in got and b"Bcc:" not in got_bcc
    setup.relayd.wait_for_log("peer=unix")
    assert setup.relayd.stop() == 0

    down = PRINTF % (rcpt.address.encode(), b"while stopped")
    result = relayd_cli(setup.config_path, "sendmail", "-t", f"-f{sender.address}", stdin=down)
    assert result.returncode == 0, result.stderr
    maildrop = setup.dir / "state" / "maildrop"
    assert len([p for p in maildrop.iterdir() if not p.name.startswith(".")]) == 1
    assert mail_world.messages(rcpt.name) == [got]
    setup.relayd.start()
    both = mail_world.wait_for_messages(rcpt.name, 2)
    assert any(b"Subject: while stopped" in m for m in both)
    assert not list(maildrop.iterdir())
    assert "picked up" in setup.relayd.log()
    assert setup.relayd.stop() == 0


def test_console_script_exit_codes_and_smtp_mode(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
    sender, rcpt = new_mailbox("sm"), new_mailbox("x")
    setup = _setup(relay_for, sender)
    setup.relayd.start()
    script = shutil.which("relayd-sendmail")
    assert script, "pip install -e . installs the relayd-sendmail console script"

    def sendmail(*args: str, stdin: bytes) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [script, "-C", str(setup.config_path), *args],
            input=stdin,
            capture_output=True,
            timeout=60,
            check=False,
        )

    # Recipients as arguments, without -i: a lone "." ends the message.
    ok = sendmail(
        "-i",
        "-oi",
        "-odi",
        "-oem",
        "-bm",
        "-F",
        "Cron Daemon",
        "-r",
        sender.address,
        rcpt.address,
        stdin=b"Subject: args\n\nline\n.\n",
    )
    assert ok.returncode == 0, ok.stderr
    [got] = mail_world.wait_for_messages(rcpt.name, 1)
    assert b'From: "Cron Daemon" <' + sender.address.encode() + b">" in got
    # A sender root may not use: EX_NOPERM (77); no recipients: EX_USAGE (64).
    refused = sendmail("-f", "other@example.test", rcpt.address, stdin=b"Subject: no\n\nx\n")
    assert refused.returncode == 77 and b"550" in refused.stderr
    assert sendmail("-f", sender.address, stdin=b"Subject: none\n\nx\n").returncode == 64
    assert sendmail("-X", rcpt.address, stdin=b"").returncode == 64
    # -bs: the caller speaks SMTP itself (Symfony), with the daemon behind submit.sock.
    dialogue = (
        f"EHLO app\r\nMAIL FROM:<{sender.address}>\r\nRCPT TO:<{rcpt.address}>\r\nDATA\r\n"
        "Subject: bs mode\r\n\r\nhello\r\n.\r\nQUIT\r\n"
    ).encode()
    smtp = sendmail("-bs", stdin=dialogue)
    assert smtp.returncode == 0 and b"250 2.0.0 queued as" in smtp.stdout, smtp.stdout
    wait_until(lambda: len(mail_world.messages(rcpt.name)) == 2, what="the -bs message")
    assert setup.relayd.stop() == 0
    # -bs with the daemon down: the message waits in the maildrop.
    smtp = sendmail("-bs", stdin=dialogue.replace(b"bs mode", b"bs later"))
    assert smtp.returncode == 0 and b"queued in maildrop" in smtp.stdout, smtp.stdout
    setup.relayd.start()
    later = mail_world.wait_for_messages(rcpt.name, 3)
    assert any(b"Subject: bs later" in m for m in later)
    assert setup.relayd.stop() == 0
