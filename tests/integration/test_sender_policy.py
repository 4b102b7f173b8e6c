"""Who may send as whom, open-relay probes and SMTP smuggling, end to end through Postfix."""

from __future__ import annotations

import base64
import smtplib
import socket
import time
from pathlib import Path

import pytest
from mailworld.world import MailWorld

from .conftest import NewMailbox, RelaydSetupFactory, RelayFor, custom_tenant
from .test_relay_delivery import message, send

pytestmark = pytest.mark.integration


def test_client_allowed_a_cannot_send_as_b(
    mail_world: MailWorld, new_mailbox: NewMailbox, relayd_setup: RelaydSetupFactory, tmp_path: Path
) -> None:
    a, b, rcpt = new_mailbox("senda"), new_mailbox("sendb"), new_mailbox("rcpt")
    secrets_dir = tmp_path / "secrets"
    tenant_b = custom_tenant(
        mail_world, secrets_dir, b, port=mail_world.smtp_starttls_port, tls="starttls"
    )
    setup = relayd_setup(
        {
            "a": custom_tenant(
                mail_world, secrets_dir, a, port=mail_world.smtp_starttls_port, tls="starttls"
            ),
            "b": tenant_b,
        },
        may_send_as=[a.address],
    )
    setup.relayd.start()
    with smtplib.SMTP("127.0.0.1", setup.port, timeout=30) as smtp:
        smtp.login("app", setup.client_password)
        # B in MAIL FROM: refused at once.
        code, text = smtp.mail(b.address)
        assert (code, text[:5]) == (550, b"5.7.1")
        smtp.rset()
        # A in MAIL FROM but B in the From: header: refused at the end of DATA.
        smtp.mail(a.address)
        smtp.rcpt(rcpt.address)
        # smtplib's data() returns the final reply instead of raising on it.
        code, text = smtp.data(message(b.address, rcpt.address, "forged from"))
        assert code == 550 and text.startswith(b"5.7.1"), (code, text)
    # Anonymous (no AUTH) may send as nothing by default: not an open relay.
    with smtplib.SMTP("127.0.0.1", setup.port, timeout=30) as smtp:
        smtp.ehlo("anonymous.test")
        code, text = smtp.mail(a.address)
        assert code == 550 and text.startswith(b"5.7.1")
    # A control message from A goes out; nothing of the refused ones ever did.
    send(
        setup.port,
        a.address,
        [rcpt.address],
        message(a.address, rcpt.address, "control"),
        login=("app", setup.client_password),
    )
    [raw] = mail_world.wait_for_messages(rcpt.name, 1)
    assert b"Subject: control" in raw
    time.sleep(1)
    assert len(mail_world.messages(rcpt.name)) == 1
    assert setup.relayd.stop() == 0


SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n\x00.\r\n", b"\n.\r", b".\n"]


def _reply(sock: socket.socket, buf: bytearray) -> bytes:
    while True:
        while b"\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError("connection closed")
            buf += chunk
        line, _, rest = bytes(buf).partition(b"\r\n")
        buf[:] = rest
        if line[3:4] != b"-":
            return line


def test_smuggling_sequences_give_exactly_one_upstream_message(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
    sender, victim, smuggled = new_mailbox("smug"), new_mailbox("victim"), new_mailbox("smuggled")
    setup = relay_for(sender)
    setup.relayd.start()
    expected = 0
    for i, seq in enumerate(SMUGGLING):
        payload = (
            f"From: <{sender.address}>\r\nTo: <{victim.address}>\r\n".encode()
            + f"Subject: smuggle {i}\r\n\r\nbody".encode()
            + seq
            + f"MAIL FROM:<{sender.address}>\r\nRCPT TO:<{smuggled.address}>\r\nDATA\r\n".encode()
            + f"From: <{sender.address}>\r\nSubject: smuggled {i}\r\n\r\nevil\r\n.\r\n".encode()
        )
        with socket.create_connection(("127.0.0.1", setup.port), timeout=30) as sock:
            buf = bytearray()
            assert _reply(sock, buf).startswith(b"220")
            auth = base64.b64encode(b"\0app\0" + setup.client_password.encode())
            for cmd in (
                b"EHLO app.test",
                b"AUTH PLAIN " + auth,
                f"MAIL FROM:<{sender.address}>".encode(),
                f"RCPT TO:<{victim.address}>".encode(),
                b"DATA",
            ):
                sock.sendall(cmd + b"\r\n")
                reply = _reply(sock, buf)
                assert reply[:1] in (b"2", b"3"), (cmd, reply)
            sock.sendall(payload)
            final = _reply(sock, buf)
            # After the one real end of DATA nothing else may follow from the payload.
            sock.sendall(b"QUIT\r\n")
            assert _reply(sock, buf).startswith(b"221")
        if b"\x00" in seq:
            assert final.startswith(b"554 5.6.0"), final
        else:
            assert final.startswith(b"250 2.0.0 queued as"), (seq, final)
            expected += 1
    got = mail_world.wait_for_messages(victim.name, expected, timeout=30)
    time.sleep(1.5)
    got = mail_world.messages(victim.name)
    assert len(got) == expected
    assert mail_world.messages(smuggled.name) == []
    # Each upstream message is one transaction with the smuggled text as body content.
    assert all(b"evil" in m for m in got)
    assert setup.relayd.stop() == 0
