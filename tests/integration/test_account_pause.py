"""Wrong app password: the account pauses, mail is held (not bounced), and resumes when fixed."""

from __future__ import annotations

import json
import re
import time

import pytest
from mailworld.world import MailWorld

from .conftest import NewMailbox, RelayFor
from .relayd_proc import write_secret
from .test_relay_delivery import message, send, spooled

pytestmark = pytest.mark.integration


def test_wrong_password_pauses_holds_then_restart_with_right_password_sends(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
    sender, rcpt = new_mailbox("paused"), new_mailbox("rcpt")
    setup = relay_for(sender, password="definitely-wrong")
    setup.relayd.start()
    reply = send(
        setup.port,
        sender.address,
        [rcpt.address],
        message(sender.address, rcpt.address, "held mail"),
        login=("app", setup.client_password),
    )
    queue_id = reply.rsplit(" ", 1)[1]
    # The attempt line is written after the alert: wait for both.
    setup.relayd.wait_for_log("ALERT account paused", timeout=30)
    log = setup.relayd.wait_for_log("status=held", timeout=30)
    # Two consecutive refusals: the first defers, the second pauses.
    assert log.count("status=deferred") >= 1
    assert "status=held" in log
    state = setup.dir / "state"
    deadline = time.monotonic() + 10  # the move into hold/ follows the attempt's log line
    while spooled(state)["hold"] != [queue_id] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert spooled(state)["hold"] == [queue_id]
    [account_file] = list((state / "accounts").glob("*.json"))
    health = json.loads(account_file.read_text())
    assert health["state"] == "paused" and "535" in health["reason"]
    # Paused: no more attempts, one alert only, and no bounce to the sender.
    time.sleep(3)
    log = setup.relayd.log()
    assert log.count("ALERT account paused") == 1
    assert mail_world.messages(sender.name) == []
    assert mail_world.messages(rcpt.name) == []
    # New mail for the paused account is still accepted and held.
    reply2 = send(
        setup.port,
        sender.address,
        [rcpt.address],
        message(sender.address, rcpt.address, "held mail 2"),
        login=("app", setup.client_password),
    )
    queue_id2 = reply2.rsplit(" ", 1)[1]
    deadline = time.monotonic() + 10
    while queue_id2 not in spooled(state)["hold"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(spooled(state)["hold"]) == sorted([queue_id, queue_id2])
    assert setup.relayd.stop() == 0
    # Pause survives the restart: same wrong password, still paused, still held.
    setup.relayd.start()
    time.sleep(2)
    assert sorted(spooled(state)["hold"]) == sorted([queue_id, queue_id2])
    assert setup.relayd.stop() == 0
    # The operator fixes the password; after a restart the held mail goes out.
    write_secret(setup.dir / "secrets" / sender.name, sender.password)
    setup.relayd.start()
    got = mail_world.wait_for_messages(rcpt.name, 2, timeout=30)
    assert len(got) == 2
    assert spooled(state) == {"incoming": [], "active": [], "deferred": [], "hold": []}
    assert json.loads(account_file.read_text())["state"] == "ok"
    assert mail_world.messages(sender.name) == []  # never bounced


def test_a_paused_account_resumes_when_its_probe_login_succeeds(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
    """SPEC: a paused account is probed with a login alone every retry.max (2 s here)."""
    sender, rcpt = new_mailbox("probed"), new_mailbox("rcpt")
    configured = "the-password-relayd-has"
    setup = relay_for(sender, password=configured)
    setup.relayd.start()
    send(
        setup.port,
        sender.address,
        [rcpt.address],
        message(sender.address, rcpt.address, "held until the probe"),
        login=("app", setup.client_password),
    )
    setup.relayd.wait_for_log("status=held", timeout=30)
    # The mailbox's password is changed to the one relayd has: nothing is reloaded.
    mail_world.set_password(sender.name, configured)
    paused_at = time.monotonic()
    setup.relayd.wait_for_log("probe login succeeded; resuming", timeout=20)
    [got] = mail_world.wait_for_messages(rcpt.name, 1, timeout=20)
    assert time.monotonic() - paused_at < 15  # on time, not at some minute's tick
    assert b"Subject: held until the probe" in got
    assert setup.relayd.stop() == 0


def test_a_wrong_password_costs_one_auth_command_per_attempt(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
    sender, rcpt = new_mailbox("oneauth"), new_mailbox("rcpt")
    setup = relay_for(sender, password="definitely-wrong-too")
    before = len(mail_world.postfix_log())
    setup.relayd.start()
    send(
        setup.port,
        sender.address,
        [rcpt.address],
        message(sender.address, rcpt.address, "one login per attempt"),
        login=("app", setup.client_password),
    )
    log = setup.relayd.wait_for_log("status=held", timeout=30)  # two refusals: paused
    attempts = log.count(f"to=<{rcpt.address}>")
    assert attempts == 2
    time.sleep(1)  # Postfix's log line may trail the reply
    refused = re.findall(r"SASL (\w+) authentication failed", mail_world.postfix_log()[before:])
    # One AUTH command per attempt, with one mechanism: not PLAIN, then LOGIN.
    assert len(refused) == attempts, refused
    assert set(refused) == {"PLAIN"}
