"""An account's limits (SPEC "Configuration" `limits:`), measured where they matter: at the
provider. `max_recipients` splits one message into transactions of at most that many
recipients (Gmail caps a message at 100, and some providers far lower); every recipient gets
exactly one copy. `max_messages_per_minute` spaces the messages an account starts, as
Microsoft 365's 30 a minute demands; the rate is read from Postfix's own log."""

from __future__ import annotations

import re
from datetime import datetime

import pytest
from mailworld.world import MailWorld

from .conftest import NewMailbox, RelayFor
from .ops_cli import wait_until
from .test_relay_delivery import message, send, spooled

pytestmark = pytest.mark.integration

# Postfix logs each transaction once, when its queue file is made: `QUEUEID: client=...,
# sasl_method=..., sasl_username=ADDRESS`; cleanup then logs the message's recipients count
# when qmgr picks it up: `QUEUEID: from=<...>, size=..., nrcpt=N (queue active)`.
_STAMP = r"^(?P<stamp>\w{3}\s+\d+ \d\d:\d\d:\d\d(?:\.\d+)?)"


def _transactions(log: str, address: str) -> list[tuple[str, datetime]]:
    """(Postfix queue id, when) of each transaction logged in as ``address``."""
    found = []
    pattern = _STAMP + rf".*: (?P<qid>[0-9A-F]+): client=.*sasl_username={re.escape(address)}$"
    for m in re.finditer(pattern, log, re.MULTILINE):
        stamp = " ".join(m.group("stamp").split())
        fmt = "%b %d %H:%M:%S.%f" if "." in stamp else "%b %d %H:%M:%S"
        found.append((m.group("qid"), datetime.strptime(stamp, fmt)))
    return found


def _recipients_per_transaction(log: str, qids: list[str], sender: str) -> list[int]:
    counts = []
    for qid in qids:
        m = re.search(rf"{qid}: from=<{re.escape(sender)}>, size=\d+, nrcpt=(\d+)", log)
        assert m is not None, f"no qmgr line for {qid}"
        counts.append(int(m.group(1)))
    return counts


def test_max_recipients_splits_a_message_into_transactions(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
    sender = new_mailbox("split")
    rcpts = [new_mailbox(f"r{i}") for i in range(5)]
    setup = relay_for(sender)
    setup.config["tenants"]["t"]["limits"] = {"max_recipients": 2}
    setup.rewrite_config()
    before = len(mail_world.postfix_log())
    setup.relayd.start()
    send(
        setup.port,
        sender.address,
        [r.address for r in rcpts],
        message(sender.address, rcpts[0].address, "split five ways"),
        login=("app", setup.client_password),
    )
    for r in rcpts:
        [got] = mail_world.wait_for_messages(r.name, 1, timeout=30)
        assert b"Subject: split five ways" in got
    wait_until(lambda: not any(spooled(setup.dir / "state").values()), what="an empty spool")
    log = mail_world.postfix_log()[before:]
    qids = [qid for qid, _ in _transactions(log, sender.address)]
    wait_until(
        lambda: all(f"{q}: from=<" in mail_world.postfix_log() for q in qids),
        what="Postfix's qmgr lines",
    )
    log = mail_world.postfix_log()[before:]
    # 2 + 2 + 1: three transactions, none above the limit, and each recipient once.
    assert sorted(_recipients_per_transaction(log, qids, sender.address)) == [1, 2, 2]
    for r in rcpts:
        assert len(mail_world.messages(r.name)) == 1
    assert setup.relayd.stop() == 0


def test_max_messages_per_minute_spaces_the_accounts_messages(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
    sender, rcpt = new_mailbox("rate"), new_mailbox("rcpt")
    setup = relay_for(sender)
    setup.config["tenants"]["t"]["limits"] = {"max_messages_per_minute": 2}
    setup.rewrite_config()
    before = len(mail_world.postfix_log())
    setup.relayd.start()
    for i in range(4):
        send(
            setup.port,
            sender.address,
            [rcpt.address],
            message(sender.address, rcpt.address, f"paced {i}"),
            login=("app", setup.client_password),
        )
    got = mail_world.wait_for_messages(rcpt.name, 4, timeout=150)
    assert sorted(m.split(b"Subject: ", 1)[1].split(b"\n", 1)[0].strip() for m in got) == [
        f"paced {i}".encode() for i in range(4)
    ]
    times = sorted(t for _, t in _transactions(mail_world.postfix_log()[before:], sender.address))
    assert len(times) == 4
    # No more than 2 in any minute at Postfix: the 3rd a minute after the 1st, the 4th a
    # minute after the 2nd. Postfix stamps whole seconds, so a minute reads as >= 59 s.
    for earlier, later in zip(times, times[2:], strict=False):
        assert (later - earlier).total_seconds() >= 59, times
    assert setup.relayd.stop() == 0
