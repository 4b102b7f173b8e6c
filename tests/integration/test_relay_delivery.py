"""swaks/smtplib → relayd → Postfix submission (STARTTLS and implicit TLS) → Dovecot."""

from __future__ import annotations

import base64
import imaplib
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from mailworld.world import MailWorld

from relayd.core.queues import Queue
from relayd.spool.store import Spool

from .conftest import Mailbox, NewMailbox, RelayFor
from .relayd_proc import spool_messages

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


def imap_bodies(world: MailWorld, mailbox: Mailbox) -> list[bytes]:
    ctx = ssl.create_default_context(cafile=str(world.pki.ca_cert))
    with imaplib.IMAP4_SSL("127.0.0.1", world.imaps_port, ssl_context=ctx) as imap:
        imap.login(mailbox.address, mailbox.password)
        imap.select("INBOX", readonly=True)
        _, data = imap.search(None, "ALL")
        bodies: list[bytes] = []
        for num in data[0].split():
            _, parts = imap.fetch(num, "(BODY.PEEK[TEXT])")
            fetched = parts[0]
            assert isinstance(fetched, tuple), parts
            bodies.append(fetched[1])
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
        q: [p.name for p in spool_messages(root / q)]
        for q in ("incoming", "active", "deferred", "hold")
    }


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_delivers_through_postfix_byte_identical(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor, tls: str
) -> None:
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


def test_swaks_client(mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor) -> None:
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


def test_upstream_down_then_up_and_sigkill_loses_nothing(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
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
        # Each one tried and deferred: none is between two queues while they are listed.
        setup.relayd.wait_for_log("status=deferred", count=5)
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


def test_connections_are_reused_and_capped_per_account(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
    """20 queued messages for one account: at most max_connections (3) logins, not 20."""
    sender, rcpt = new_mailbox("reuse"), new_mailbox("rcpt")
    setup = relay_for(sender)
    mail_world.stop_postfix()
    try:
        setup.relayd.start()
        for i in range(20):
            send(
                setup.port,
                sender.address,
                [rcpt.address],
                message(sender.address, rcpt.address, f"batch {i}"),
                login=("app", setup.client_password),
            )
        setup.relayd.wait_for_log("status=deferred")
        before = len(mail_world.postfix_log())
        mail_world.start_postfix()
        got = mail_world.wait_for_messages(rcpt.name, 20, timeout=60)
    finally:
        if not mail_world.postfix_running:
            mail_world.start_postfix()
    assert len(got) == 20
    log = mail_world.postfix_log()[before:]
    port = mail_world.smtp_starttls_port
    submission_connects = [
        ln for ln in log.splitlines() if "connect from" in ln and "disconnect" not in ln
    ]
    # Each session authenticates once and carries many messages; Postfix logs one
    # "connect from" per connection (its own LMTP deliveries do not log that line).
    assert 1 <= len(submission_connects) <= 3, (port, submission_connects)
    assert setup.relayd.stop() == 0


def test_sigkill_right_after_the_final_dot_leaves_whole_or_nothing(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
    """A crash between "." and the 250 never leaves a partial message (RFC 5321 §6.1)."""
    sender, rcpt = new_mailbox("crash"), new_mailbox("rcpt")
    setup = relay_for(sender)
    big_body = b"".join(b"line %06d " % i + b"y" * 90 + b"\r\n" for i in range(20000))  # ~2 MB
    data = message(sender.address, rcpt.address, "crash").split(b"\r\n\r\n", 1)[0]
    data += b"\r\n\r\n" + big_body
    mail_world.stop_postfix()  # keep whatever was accepted in the spool, for inspection
    try:
        for _ in range(3):
            setup.relayd.start()
            auth = base64.b64encode(b"\0app\0" + setup.client_password.encode())
            with socket.create_connection(("127.0.0.1", setup.port), timeout=30) as sock:
                sock.recv(1024)
                sock.sendall(
                    b"EHLO app.test\r\nAUTH PLAIN "
                    + auth
                    + b"\r\n"
                    + f"MAIL FROM:<{sender.address}>\r\nRCPT TO:<{rcpt.address}>\r\n".encode()
                    + b"DATA\r\n"
                )
                time.sleep(0.3)
                sock.sendall(data + b"\r\n.\r\n")
                setup.relayd.kill()
            state = setup.dir / "state" / "spool"
            assert sorted(p.name for p in (state / "active").iterdir()) == []
            # Whatever is spooled is whole: it loads (trailer and length check) with the body.
            spool = Spool(setup.dir / "state", fsync=False)
            for queue in (Queue.INCOMING, Queue.DEFERRED):
                for qid in spool.list(queue):
                    content = spool.load(qid, queue).read_content()
                    assert content.endswith(big_body)
        accepted = len(spool.list(Queue.INCOMING)) + len(spool.list(Queue.DEFERRED))
        setup.relayd.start()
        assert list((setup.dir / "state" / "spool" / "tmp").iterdir()) == []
    finally:
        mail_world.start_postfix()
    got = mail_world.wait_for_messages(rcpt.name, accepted, timeout=60) if accepted else []
    assert all(body_of(m) == big_body.replace(b"\r\n", b"\n") for m in got)
    assert setup.relayd.stop() == 0
