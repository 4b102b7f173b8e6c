"""Self-test of the mail world: real Postfix and Dovecot on loopback."""

from __future__ import annotations

import imaplib
import smtplib
import socket
import ssl

import pytest

from .world import REJECTED_DOMAIN, MailWorld

pytestmark = pytest.mark.integration

BODY = b"Hello there.\r\n.a line with a leading dot\r\n\r\nlast line\r\n"


def _tls(world: MailWorld) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(world.pki.ca_cert))


def _message(sender: str, rcpt: str, subject: str) -> bytes:
    head = f"From: {sender}\r\nTo: {rcpt}\r\nSubject: {subject}\r\n\r\n"
    return head.encode() + BODY


def _body(raw: bytes) -> bytes:
    return raw.split(b"\n\n", 1)[1]


def test_starttls_submission_delivers_to_inbox(mail_world: MailWorld) -> None:
    sender, password = mail_world.new_user("sender")
    rcpt, _ = mail_world.new_user("rcpt")
    with smtplib.SMTP("localhost", mail_world.smtp_starttls_port, timeout=10) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls")
        assert not smtp.has_extn("auth"), "AUTH must need TLS first"
        smtp.starttls(context=_tls(mail_world))
        smtp.ehlo()
        assert smtp.has_extn("auth")
        smtp.login(sender, password)
        smtp.sendmail(sender, [rcpt], _message(sender, rcpt, "via starttls"))
    (raw,) = mail_world.wait_for_messages(rcpt, 1)
    assert b"Subject: via starttls\n" in raw
    # Dovecot stores maildir files with LF line endings.
    assert _body(raw) == BODY.replace(b"\r\n", b"\n")


def test_implicit_tls_submission_delivers(mail_world: MailWorld) -> None:
    sender, password = mail_world.new_user("sender")
    rcpt, _ = mail_world.new_user("rcpt")
    with smtplib.SMTP_SSL(
        "localhost", mail_world.smtp_implicit_port, context=_tls(mail_world), timeout=10
    ) as smtp:
        smtp.login(sender, password)
        smtp.sendmail(sender, [rcpt], _message(sender, rcpt, "via implicit tls"))
    (raw,) = mail_world.wait_for_messages(rcpt, 1)
    assert _body(raw) == BODY.replace(b"\r\n", b"\n")


def test_recipient_elsewhere_is_refused_at_rcpt(mail_world: MailWorld) -> None:
    sender, password = mail_world.new_user("sender")
    bad = f"x@{REJECTED_DOMAIN}"
    with smtplib.SMTP_SSL(
        "localhost", mail_world.smtp_implicit_port, context=_tls(mail_world), timeout=10
    ) as smtp:
        smtp.login(sender, password)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            smtp.sendmail(sender, [bad], _message(sender, bad, "nowhere"))
    code, text = refused.value.recipients[bad]
    assert 500 <= code < 600, (code, text)


def test_unauthenticated_relay_is_refused(mail_world: MailWorld) -> None:
    rcpt, _ = mail_world.new_user("rcpt")
    anon = "a@example.test"
    with (
        smtplib.SMTP_SSL(
            "localhost",
            mail_world.smtp_implicit_port,
            context=_tls(mail_world),
            timeout=10,
        ) as smtp,
        pytest.raises(smtplib.SMTPRecipientsRefused),
    ):
        smtp.sendmail(anon, [rcpt], _message(anon, rcpt, "x"))


def test_plain_port_offers_auth_but_no_starttls(mail_world: MailWorld) -> None:
    user, password = mail_world.new_user("plain")
    with smtplib.SMTP("127.0.0.1", mail_world.smtp_plain_port, timeout=10) as smtp:
        smtp.ehlo()
        assert not smtp.has_extn("starttls")
        assert smtp.has_extn("auth")
        smtp.login(user, password)


def test_wronghost_certificate_fails_verification(mail_world: MailWorld) -> None:
    ctx = _tls(mail_world)
    address = ("127.0.0.1", mail_world.smtp_wronghost_port)
    with (
        socket.create_connection(address, 10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        ctx.wrap_socket(raw, server_hostname="localhost")
    # Same CA: the certificate is fine for the name it was issued for.
    name = mail_world.pki.wrong_host_name
    with (
        socket.create_connection(address, 10) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as tls,
    ):
        assert tls.recv(100).startswith(b"220 ")


def test_imap_users_added_and_changed_mid_run(mail_world: MailWorld) -> None:
    user, password = mail_world.new_user("imap")
    with imaplib.IMAP4("localhost", mail_world.imap_port, timeout=10) as imap:
        imap.starttls(_tls(mail_world))
        imap.login(user, password)
        typ, boxes = imap.list()
        assert typ == "OK"
        assert any(b"\\Sent" in b for b in boxes if isinstance(b, bytes))
        imap.append("Sent", None, None, b"Subject: saved\r\n\r\nbody\r\n")
    assert mail_world.messages(user, "Sent") == [b"Subject: saved\n\nbody\n"]

    mail_world.set_password(user, "changed")
    ctx = _tls(mail_world)
    with (
        imaplib.IMAP4_SSL("localhost", mail_world.imaps_port, ssl_context=ctx) as imap,
        pytest.raises(imaplib.IMAP4.error),
    ):
        imap.login(user, password)
    with imaplib.IMAP4_SSL("localhost", mail_world.imaps_port, ssl_context=ctx) as imap:
        imap.login(user, "changed")


def test_postfix_can_go_down_and_come_back(mail_world: MailWorld) -> None:
    sender, password = mail_world.new_user("sender")
    rcpt, _ = mail_world.new_user("rcpt")
    try:
        mail_world.stop_postfix()
        for port in (mail_world.smtp_starttls_port, mail_world.smtp_implicit_port):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
    finally:
        mail_world.start_postfix()
    with smtplib.SMTP("localhost", mail_world.smtp_starttls_port, timeout=10) as smtp:
        smtp.starttls(context=_tls(mail_world))
        smtp.login(sender, password)
        smtp.sendmail(sender, [rcpt], _message(sender, rcpt, "after restart"))
    mail_world.wait_for_messages(rcpt, 1)
