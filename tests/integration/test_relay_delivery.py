"""swaks/smtplib → relayd → Postfix submission (STARTTLS and implicit TLS) → Dovecot."""

from __future__ import annotations

import imaplib
import smtplib
import ssl
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

BODY = (
    b"Line one\r\n"
    b".leading dot survives\r\n"
    b"..two dots\r\n"
    b"8-bit: \xc3\xa9t\xc3\xa9 \xe2\x82\xac\r\n"
    b"a long line " + b"x" * 1500 + b"\r\n"
    b"\r\n"
    b"last line\r\n"
)


def message(sender: str, rcpt: str, subject: str) -> bytes:
    return (
        f"From: Sender <{sender}>\r\nTo: <{rcpt}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}@relayd.test>\r\n"
        "Date: Sat, 21 Nov 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + BODY


# Dovecot's Maildir stores lines with LF endings; compare in that form.
BODY_AS_STORED = BODY.replace(b"\r\n", b"\n")


def body_of(raw: bytes) -> bytes:
    return raw.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]


def header(raw: bytes, name: bytes) -> bytes:
    return next(ln for ln in raw.splitlines() if ln.lower().startswith(name.lower() + b":"))


def imap_bodies(world, mailbox) -> list[bytes]:
    ctx = ssl.create_default_context(cafile=str(world.pki.ca_cert))
    with imaplib.IMAP4_SSL("127.0.0.1", world.imaps_port, ssl_context=ctx) as imap:
        imap.login(mailbox.address, mailbox.password)
        imap.select("INBOX", readonly=True)
        _, data = imap.search(None, "ALL")
        bodies = []
        for num in data[0].split():
            _, parts = imap.fetch(num, "(BODY.PEEK[TEXT])")
            bodies.append(parts[0][1])
        return bodies


def send(
    port: int, sender: str, rcpts: list[str], data: bytes, login: tuple[str, str] | None = None
) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.ehlo("app.test")
        if login:
            smtp.login(*login)
        smtp.mail(sender, ["BODY=8BITMIME"])
        for r in rcpts:
            code, msg = smtp.rcpt(r)
            assert code == 250, (code, msg)
        code, reply = smtp.data(data)
        assert code == 250, (code, reply)
        return reply.decode()


def spooled(state: Path) -> dict[str, list[str]]:
    root = state / "spool"
    return {
        q: sorted(p.name for p in (root / q).iterdir())
        for q in ("incoming", "active", "deferred", "hold")
    }


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_delivers_through_postfix_byte_identical(mail_world, new_mailbox, relay_for, tls):
    sender, rcpt = new_mailbox("alice"), new_mailbox("rcpt")
    port = mail_world.smtp_starttls_port if tls == "starttls" else mail_world.smtp_implicit_port
    setup = relay_for(sender, port=port, tls=tls)
    setup.relayd.start()
    reply = send(
        setup.port,
        sender.address,
        [rcpt.address],
        message(sender.address, rcpt.address, f"via {tls}"),
        login=("app", setup.client_password),
    )
    assert reply.startswith("2.0.0 queued as ")
    queue_id = reply.rsplit(" ", 1)[1]
    [raw] = mail_world.wait_for_messages(rcpt.name, 1)
    assert body_of(raw) == BODY_AS_STORED
    assert f"Subject: via {tls}".encode() in raw
    # Over IMAP the message comes back in wire form (CRLF): the body is byte-identical.
    assert imap_bodies(mail_world, rcpt) == [BODY]
    log = setup.relayd.wait_for_log("status=delivered")
    line = next(ln for ln in log.splitlines() if "status=delivered" in ln)
    assert queue_id in line and sender.address in line and f"relay=127.0.0.1:{port}" in line
    # The spool is empty once delivered.
    assert spooled(setup.dir / "state") == {
        "incoming": [],
        "active": [],
        "deferred": [],
        "hold": [],
    }
    assert setup.relayd.stop() == 0


def test_swaks_client(mail_world, new_mailbox, relay_for):
    sender, rcpt = new_mailbox("swaks"), new_mailbox("rcpt")
    setup = relay_for(sender)
    setup.relayd.start()
    out = subprocess.run(
        [
            "swaks",
            "--server",
            f"127.0.0.1:{setup.port}",
            "--from",
            sender.address,
            "--to",
            rcpt.address,
            "--auth",
            "PLAIN",
            "--auth-user",
            "app",
            "--auth-password",
            setup.client_password,
            "--header",
            "Subject: from swaks",
            "--body",
            "hello from swaks",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0 queued as" in out.stdout
    [raw] = mail_world.wait_for_messages(rcpt.name, 1)
    assert b"hello from swaks" in raw


def test_upstream_down_then_up_and_sigkill_loses_nothing(mail_world, new_mailbox, relay_for):
    sender, rcpt = new_mailbox("spool"), new_mailbox("rcpt")
    setup = relay_for(sender)
    mail_world.stop_postfix()
    try:
        setup.relayd.start()
        ids = []
        for i in range(5):
            reply = send(
                setup.port,
                sender.address,
                [rcpt.address],
                message(sender.address, rcpt.address, f"spooled {i}"),
                login=("app", setup.client_password),
            )
            ids.append(reply.rsplit(" ", 1)[1])
        setup.relayd.wait_for_log("status=deferred")
        waiting = spooled(setup.dir / "state")
        assert sorted(waiting["incoming"] + waiting["active"] + waiting["deferred"]) == sorted(ids)
        # The crash: SIGKILL while the mail waits for the upstream.
        setup.relayd.kill()
        mail_world.start_postfix()
        setup.relayd.start()
        got = mail_world.wait_for_messages(rcpt.name, 5, timeout=30)
    finally:
        if not mail_world.postfix_running:
            mail_world.start_postfix()
    time.sleep(1.5)  # nothing more may arrive: exactly once each here
    got = mail_world.messages(rcpt.name)
    subjects = sorted(header(m, b"Subject") for m in got)
    assert subjects == [f"Subject: spooled {i}".encode() for i in range(5)]
    assert all(body_of(m) == BODY_AS_STORED for m in got)
    assert setup.relayd.stop() == 0
