"""Faults of the machine relayd runs on: a spool that turns read-only for a while."""

from __future__ import annotations

import re
import smtplib
import subprocess
import time
from pathlib import Path

import pytest
from mailworld.world import MailWorld

from .conftest import NewMailbox, RelayFor
from .test_relay_delivery import message

pytestmark = pytest.mark.integration


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _send(port: int, sender: str, rcpt: str, subject: str, password: str) -> str:
    """The reply to the message: 250 … or the 4xx the client got."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
            smtp.login("app", password)
            smtp.sendmail(sender, [rcpt], message(sender, rcpt, subject))
    except smtplib.SMTPResponseException as exc:
        error = exc.smtp_error
        text = error.decode(errors="replace") if isinstance(error, bytes) else error
        return f"{exc.smtp_code} {text}"
    return "250"


def test_a_read_only_spool_for_a_few_seconds_loses_and_strands_nothing(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
    sender, rcpt = new_mailbox("rospool"), new_mailbox("rcpt")
    setup = relay_for(sender)
    setup.relayd.start()
    spool: Path = setup.dir / "state" / "spool"
    mail_world.stop_postfix()
    mounted, postfix_down = False, True
    try:
        # Deferred before the fault: the upstream is down.
        accepted = [
            _send(setup.port, sender.address, rcpt.address, "before", setup.client_password)
        ]
        setup.relayd.wait_for_log("status=deferred", timeout=30)
        # The spool turns read-only: a read-only bind mount over it, as an operator's mistake
        # or a file system remounted after an error would do.
        _mount("--bind", str(spool), str(spool))
        mounted = True
        _mount("-o", "remount,bind,ro", str(spool))
        replies = []
        for i in range(40):  # until the files reserved before the fault are used up
            replies.append(
                _send(
                    setup.port, sender.address, rcpt.address, f"during {i}", setup.client_password
                )
            )
            if replies[-1].startswith("4"):
                break
        refused = [r for r in replies if not r.startswith("250")]
        assert refused and all(r.startswith("452 4.3.1") for r in refused), replies
        accepted += [r for r in replies if r.startswith("250")]  # durable: reserved earlier
        time.sleep(4)  # retries meet the read-only disk meanwhile
        log = setup.relayd.log()
        assert "Read-only file system" in log
        _mount("-o", "remount,bind,rw", str(spool))
        _mount("--make-private", str(spool))
        subprocess.run(["umount", str(spool)], check=True)
        mounted = False
        accepted.append(
            _send(setup.port, sender.address, rcpt.address, "after", setup.client_password)
        )
        assert all(r == "250" for r in accepted)
        mail_world.start_postfix()
        postfix_down = False
        # Every message that got its 250 goes out, with no restart of relayd.
        got = mail_world.wait_for_messages(rcpt.name, len(accepted), timeout=60)
        subjects = sorted(re.findall(rb"Subject: (\S+)", m)[0] for m in got)
        assert len(subjects) == len(accepted)
        assert b"before" in subjects and b"after" in subjects
        assert setup.relayd.proc is not None and setup.relayd.proc.poll() is None
        assert "degraded" not in setup.relayd.log()  # no task died of it
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(spool)], check=False)
        if postfix_down:
            mail_world.start_postfix()
