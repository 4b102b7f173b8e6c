"""SIGTERM ends relayd within its stop deadline, whatever is stalled, and loses nothing."""

from __future__ import annotations

import base64
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mailworld.stalling import HoldingUpstream, StallingImapProxy
from mailworld.world import MailWorld

from .conftest import NewMailbox, RelaydSetupFactory
from .relayd_proc import write_secret
from .test_relay_delivery import message, send
from .test_sent_copy import fetch_all

pytestmark = pytest.mark.integration

STOP_TIMEOUT = 6.0


@pytest.fixture
def stalling(mail_world: MailWorld) -> Iterator[tuple[HoldingUpstream, StallingImapProxy]]:
    upstream = HoldingUpstream(mail_world.lmtp_port)
    proxy = StallingImapProxy(mail_world.imap_port)
    upstream.start()
    proxy.start()
    try:
        yield upstream, proxy
    finally:
        upstream.stop()
        proxy.stop()


def _subjects(messages: list[bytes]) -> list[str]:
    found = []
    for raw in messages:
        for line in raw.splitlines():
            if line.startswith(b"Subject: "):
                found.append(line[9:].decode())
                break
    return sorted(found)


def _wait(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigterm_ends_within_the_deadline_and_nothing_is_lost(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    stalling: tuple[HoldingUpstream, StallingImapProxy],
    tmp_path: Path,
) -> None:
    upstream, proxy = stalling
    sender, rcpt = new_mailbox("stop"), new_mailbox("rcpt")
    secret = write_secret(tmp_path / "secrets" / sender.name, sender.password)
    tenant = {
        "provider": "custom",
        # A local hop without AUTH, and IMAP in plain text on loopback (Dovecot counts
        # 127.0.0.1 as secure): the stalls are made in between.
        "smtp": {"host": "127.0.0.1", "port": upstream.port, "tls": "none"},
        "imap": {"host": "127.0.0.1", "port": proxy.port, "tls": "none"},
        "sent_copy": "always",
        "accounts": [{"address": sender.address, "password": {"file": str(secret)}}],
    }
    setup = relayd_setup({"t": tenant}, may_send_as=[sender.address])
    setup.config["stop_timeout"] = f"{STOP_TIMEOUT:.0f}s"
    setup.rewrite_config()
    setup.relayd.start()
    login = ("app", setup.client_password)
    # Delivered; its Sent copy's APPEND stalls.
    copied = message(sender.address, rcpt.address, "copied")
    send(setup.port, sender.address, [rcpt.address], copied, login=login)
    _wait(lambda: proxy.stalled == 1, "the stalled APPEND")
    # Taken by the upstream, whose reply to the final dot never comes.
    held = message(sender.address, rcpt.address, "held").replace(b"last line", b"hold-reply")
    send(setup.port, sender.address, [rcpt.address], held, login=login)
    _wait(lambda: upstream.held == 1, "the held final reply")
    # A client in the middle of DATA.
    client = socket.create_connection(("127.0.0.1", setup.port), timeout=30)
    reader = client.makefile("rb")
    assert reader.readline().startswith(b"220")
    credentials = base64.b64encode(b"\0app\0" + setup.client_password.encode())
    for command in (
        b"EHLO c",
        b"AUTH PLAIN " + credentials,
        f"MAIL FROM:<{sender.address}>".encode(),
        f"RCPT TO:<{rcpt.address}>".encode(),
        b"DATA",
    ):
        client.sendall(command + b"\r\n")
        while (line := reader.readline())[3:4] == b"-":
            pass
        assert line[:1] in (b"2", b"3"), line
    client.sendall(b"Subject: cut off\r\n\r\nhalf a messa")

    assert setup.relayd.proc is not None
    started = time.monotonic()
    setup.relayd.proc.send_signal(signal.SIGTERM)
    code = setup.relayd.proc.wait(60)
    took = time.monotonic() - started
    print(f"SIGTERM to exit: {took:.1f} s (stop_timeout {STOP_TIMEOUT:.0f} s)")
    assert code == 0
    assert took <= STOP_TIMEOUT + 1.0
    rest = reader.read()  # the session in DATA was cut off: no 250 for it
    assert b"250 2.0.0 queued" not in rest
    client.close()

    setup.relayd.start()  # the stalls were once: this time everything goes through
    got = mail_world.wait_for_messages(rcpt.name, 2, timeout=60)
    time.sleep(2)
    subjects = _subjects(mail_world.messages(rcpt.name))
    assert subjects.count("copied") == 1
    assert 1 <= subjects.count("held") <= 2  # the one in flight, at most twice
    assert "cut off" not in subjects and len(got) >= 2
    _wait(lambda: len(fetch_all(mail_world, sender, "Sent")) >= 2, "the Sent copies", 60)
    time.sleep(2)
    sent = _subjects([raw for _, _, raw in fetch_all(mail_world, sender, "Sent")])
    assert sent == ["copied", "held"]  # one Sent copy each
    assert setup.relayd.stop() == 0
