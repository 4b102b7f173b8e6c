"""spool.encrypt_at_rest against real Postfix and Dovecot: nothing readable in the spool while
the upstream is down, the message byte-identical once it is up, and a sealed file altered on
disk quarantined, never sent."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mailworld.world import MailWorld

from .conftest import Mailbox, NewMailbox, RelaydSetup, RelayFor
from .relayd_proc import spool_messages, write_secret
from .test_relay_delivery import BODY_AS_STORED, body_of, message, send

pytestmark = pytest.mark.integration

#: The ``sealed`` fixture: sender, recipient and the started relayd.
Sealed = tuple[Mailbox, Mailbox, RelaydSetup]

# Bigger than what the scheduler reads whole with the envelope: streamed segment by segment.
BIG_BODY = b"".join(b"Confidential ledger line %06d\r\n" % i for i in range(12_000))


@pytest.fixture
def sealed(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor, tmp_path: Path
) -> Iterator[Sealed]:
    """(sender, recipient, relayd with a sealed spool, already started) while Postfix, the
    upstream, is down; Postfix is up again after the test whatever happens."""
    sender, rcpt = new_mailbox("seal"), new_mailbox("rcpt")
    setup = relay_for(sender)
    key = write_secret(tmp_path / "spool-key", secrets.token_urlsafe(32))
    setup.config["spool"]["encrypt_at_rest"] = True
    setup.config["spool"]["key"] = {"file": str(key)}
    setup.rewrite_config()
    mail_world.stop_postfix()
    try:
        setup.relayd.start()
        yield sender, rcpt, setup
    finally:
        if not mail_world.postfix_running:
            mail_world.start_postfix()


def big_message(sender: str, rcpt: str, subject: str) -> bytes:
    return message(sender, rcpt, subject).replace(b"last line\r\n", BIG_BODY)


def spool_files(setup: RelaydSetup) -> list[Path]:
    root = setup.dir / "state" / "spool"
    return [p for q in ("incoming", "active", "deferred") for p in spool_messages(root / q)]


def test_sealed_spool_shows_nothing_and_delivers_byte_identical(
    mail_world: MailWorld, sealed: Sealed
) -> None:
    sender, rcpt, setup = sealed
    login = ("app", setup.client_password)
    small = message(sender.address, rcpt.address, "sealed small")
    big = big_message(sender.address, rcpt.address, "sealed big")
    for data in (small, big):
        send(setup.port, sender.address, [rcpt.address], data, login=login)
    setup.relayd.wait_for_log("status=deferred", count=2)
    files = spool_files(setup)
    assert len(files) == 2
    states = list((setup.dir / "state" / "spool" / "state").iterdir())
    assert sorted(p.name for p in states) == sorted(f"{p.name}.json" for p in files)
    assert all(p.read_bytes().startswith(b"RELAYD1S ") for p in states)  # sealed as well
    for path in files:
        raw = path.read_bytes()
        assert raw.startswith(b"RELAYD1S ")
        for clear in (
            b"sealed small",
            b"Confidential ledger",
            b"leading dot survives",
            sender.address.encode(),
            rcpt.address.encode(),
        ):
            assert clear not in raw, (path.name, clear)
    mail_world.start_postfix()
    got = mail_world.wait_for_messages(rcpt.name, 2, timeout=30)
    bodies = sorted(body_of(m) for m in got)
    expected_big = BODY_AS_STORED.replace(b"last line\n", BIG_BODY.replace(b"\r\n", b"\n"))
    assert bodies == sorted([BODY_AS_STORED, expected_big])
    assert setup.relayd.stop() == 0


def test_an_altered_sealed_file_is_quarantined_not_sent(
    mail_world: MailWorld, sealed: Sealed
) -> None:
    sender, rcpt, setup = sealed
    data = big_message(sender.address, rcpt.address, "tampered")
    reply = send(
        setup.port, sender.address, [rcpt.address], data, login=("app", setup.client_password)
    )
    queue_id = reply.rsplit(" ", 1)[1]
    setup.relayd.wait_for_log("status=deferred")
    assert setup.relayd.stop() == 0
    root = setup.dir / "state" / "spool"
    [path] = spool_files(setup)
    raw = bytearray(path.read_bytes())
    raw[len(raw) * 2 // 3] ^= 0x01  # one bit, well past what is read with the envelope
    path.unlink()
    # Back in incoming/: tried at once after the restart.
    (root / "incoming" / queue_id).write_bytes(bytes(raw))
    (root / "incoming" / queue_id).chmod(0o600)
    mail_world.start_postfix()
    setup.relayd.start()
    setup.relayd.wait_for_log("; quarantined")
    assert (root / "corrupt" / queue_id).exists()
    assert "does not open with spool.key" in setup.relayd.log()
    time.sleep(1.0)  # Postfix was given part of the message, never its end
    assert mail_world.messages(rcpt.name) == []
    assert setup.relayd.stop() == 0
