"""Sent-folder copies (issue 4, SPEC "Sent copy" and "DSNs") against real Dovecot and Postfix.

Every copy is read back over IMAP (FETCH, CRLF wire form) and compared with what the upstream
received. Where a test needs IMAP down while SMTP works, the account's IMAP lives on a second
mail world (the same user and password there): stopping that Dovecot stops IMAP only, while
the first world's Postfix (and its Dovecot SASL back end) keep taking mail.
"""

from __future__ import annotations

import asyncio
import base64
import imaplib
import re
import signal
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mailworld.world import MailWorld

from relayd.config.model import (
    AccountConfig,
    ImapServer,
    Limits,
    OAuthConfig,
    SentCopy,
    TlsMode,
)
from relayd.sync.filing import FAULT_ENV
from relayd.sync.imap import ImapError, ImapFailure, ImapSession
from relayd.sync.wire import mailbox_argument

from .conftest import Mailbox, NewMailbox, RelaydSetup, RelaydSetupFactory, custom_tenant
from .relayd_proc import write_secret
from .test_relay_delivery import message, send, spooled

pytestmark = pytest.mark.integration

FRENCH_SENT = "Éléments envoyés"  # flagged \Sent on the second world: mUTF-7 on the wire
EXPLICIT = "Copies relayd"  # not flagged: only an explicit imap.sent_folder picks it
SECOND_WORLD_CONF = f"""
namespace inbox {{
  mailbox Sent {{
    special_use =
    auto = no
  }}
  mailbox "{FRENCH_SENT}" {{
    special_use = \\Sent
    auto = subscribe
  }}
  mailbox "{EXPLICIT}" {{
    auto = subscribe
  }}
}}
"""


@pytest.fixture(scope="module")
def second_world() -> Iterator[MailWorld]:
    """A Dovecot whose Sent folder has another name (flagged \\Sent), with its own Postfix."""
    world = MailWorld(dovecot_extra_conf=SECOND_WORLD_CONF)
    try:
        world.start()
        yield world
    finally:
        world.stop()


# -- helpers -------------------------------------------------------------------------------------


def imap_settings(world: MailWorld, *, tls: str = "implicit", **extra: str) -> dict[str, Any]:
    port = world.imaps_port if tls == "implicit" else world.imap_port
    return {
        "host": "127.0.0.1",
        "port": port,
        "tls": tls,
        "ca_file": str(world.pki.ca_cert),
        **extra,
    }


def tenant_with_imap(
    smtp_world: MailWorld, imap_world: MailWorld, secrets_dir: Path, mailbox: Mailbox, **imap: str
) -> dict[str, Any]:
    tenant = custom_tenant(
        smtp_world, secrets_dir, mailbox, port=smtp_world.smtp_starttls_port, tls="starttls"
    )
    tenant["imap"] = imap_settings(imap_world, **imap)
    return tenant


def fetch_all(
    world: MailWorld, mailbox: Mailbox, folder: str
) -> list[tuple[set[str], float, bytes]]:
    """(flags, internal date, whole message) of every message in ``folder``, over IMAP."""
    ctx = ssl.create_default_context(cafile=str(world.pki.ca_cert))
    with imaplib.IMAP4_SSL("127.0.0.1", world.imaps_port, ssl_context=ctx) as imap:
        imap.login(mailbox.address, mailbox.password)
        typ, _ = imap.select(mailbox_argument(folder), readonly=True)
        assert typ == "OK", folder
        typ, data = imap.search(None, "ALL")
        if not data[0]:
            return []
        typ, data = imap.fetch("1:*", "(FLAGS INTERNALDATE BODY.PEEK[])")
    found = []
    for item in data:
        if not isinstance(item, tuple):
            continue
        meta, raw = item
        flags = re.search(rb"FLAGS \(([^)]*)\)", meta)
        internal = imaplib.Internaldate2tuple(meta)
        assert flags is not None and internal is not None
        found.append((set(flags.group(1).decode().split()), time.mktime(internal), raw))
    return found


def wait_for_copies(
    world: MailWorld, mailbox: Mailbox, folder: str, count: int, timeout: float = 60.0
) -> list[tuple[set[str], float, bytes]]:
    deadline = time.monotonic() + timeout
    while True:
        found = fetch_all(world, mailbox, folder)
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.05)


def copy_queue(setup: RelaydSetup) -> list[str]:
    return sorted(p.name for p in (setup.dir / "state" / "spool" / "copy").iterdir())


def trace_free(delivered: bytes) -> bytes:
    """The message as the upstream received it: without the trace fields Postfix and Dovecot
    put in front (Return-Path, Delivered-To, Received, with their continuation lines)."""
    lines = delivered.split(b"\r\n")
    i = 0
    while i < len(lines) and (
        lines[i][:1] in (b" ", b"\t")
        or lines[i].split(b":", 1)[0].lower() in (b"return-path", b"delivered-to", b"received")
    ):
        i += 1
    return b"\r\n".join(lines[i:])


def imap_logins(world: MailWorld, address: str) -> int:
    return world.dovecot_log().count(f"imap-login: Info: Login: user=<{address}>")


def submit(setup: RelaydSetup, sender: Mailbox, rcpt: str, subject: str) -> tuple[str, bytes]:
    data = message(sender.address, rcpt, subject)
    reply = send(setup.port, sender.address, [rcpt], data, login=("app", setup.client_password))
    return reply.rsplit(" ", 1)[1], data


# -- a password account: one copy, \Seen, byte-identical -----------------------------------------


@pytest.mark.parametrize("tls", ["implicit", "starttls"])
def test_copy_in_sent_exactly_once_seen_byte_identical(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    tmp_path: Path,
    tls: str,
) -> None:
    sender, rcpt = new_mailbox("copier"), new_mailbox("rcpt")
    tenant = tenant_with_imap(mail_world, mail_world, tmp_path / "secrets", sender, tls=tls)
    setup = relayd_setup({"t": tenant}, may_send_as=[sender.address])
    setup.relayd.start()
    before = int(time.time())
    queue_id, data = submit(setup, sender, rcpt.address, f"copy over {tls}")
    # Waited for on disk first, so the one IMAP login in Dovecot's log so far is relayd's.
    mail_world.wait_for_messages(sender.name, 1, folder="Sent")
    after = time.time() + 1
    [login] = [
        ln
        for ln in mail_world.dovecot_log().splitlines()
        if f"imap-login: Info: Login: user=<{sender.address}>" in ln
    ]
    assert ", TLS," in login  # implicit TLS, or upgraded with STARTTLS before the login
    [(flags, internal, copy)] = fetch_all(mail_world, sender, "Sent")
    # What the upstream received (read back over IMAP from the recipient's INBOX) ...
    [(_, _, received)] = fetch_all(mail_world, rcpt, "INBOX")
    assert trace_free(received) == copy
    # ... and what the application submitted: the exact bytes, CRLF wire form.
    assert copy == data
    assert "\\Seen" in flags
    assert before <= internal <= after  # internal date = the time of delivery
    log = setup.relayd.wait_for_log("Sent copy filed")
    assert queue_id in next(ln for ln in log.splitlines() if "Sent copy filed" in ln)
    assert setup.relayd.stop() == 0
    # Exactly once, still, after a clean stop; nothing left in the spool.
    assert len(fetch_all(mail_world, sender, "Sent")) == 1
    assert copy_queue(setup) == []
    assert not any(spooled(setup.dir / "state").values())
    log = setup.relayd.log()
    assert (
        sender.password not in log
        and base64.b64encode(sender.password.encode()).decode() not in log
    )


# -- an OAuth account: AUTHENTICATE XOAUTH2, the token checked by Dovecot ----------------------

OAUTH_CLIENT = "sent-copy-client"
OAUTH_SECRET = "sent-copy-client-secret"


def test_oauth_account_copy_with_xoauth2_checked_by_dovecot(
    mail_world: MailWorld, new_mailbox: NewMailbox, relayd_setup: RelaydSetupFactory, tmp_path: Path
) -> None:
    server = mail_world.oauth  # the suite's token server; Dovecot introspects every token
    server.add_client(OAUTH_CLIENT, OAUTH_SECRET)
    sender, rcpt = new_mailbox("oauthcopy"), new_mailbox("rcpt")
    refresh = write_secret(
        tmp_path / "secrets" / "refresh", server.issue_refresh_token(sender.address, OAUTH_CLIENT)
    )
    client_secret = write_secret(tmp_path / "secrets" / "client", OAUTH_SECRET)
    tenant = {
        "provider": "custom",
        "smtp": {
            "host": "127.0.0.1",
            "port": mail_world.smtp_starttls_port,
            "tls": "starttls",
            "ca_file": str(mail_world.pki.ca_cert),
        },
        "imap": imap_settings(mail_world),
        "accounts": [
            {
                "address": sender.address,
                "oauth": {
                    "flow": "refresh_token",
                    "token_url": server.google_token_url,
                    "client_id": OAUTH_CLIENT,
                    "client_secret": {"file": str(client_secret)},
                    "refresh_token": {"file": str(refresh)},
                    "ca_file": str(mail_world.pki.ca_cert),
                },
            }
        ],
    }
    setup = relayd_setup({"t": tenant}, may_send_as=[sender.address])
    setup.relayd.start()
    _, data = submit(setup, sender, rcpt.address, "oauth copy")
    mail_world.wait_for_messages(sender.name, 1, folder="Sent")
    [login] = [
        ln
        for ln in mail_world.dovecot_log().splitlines()
        if f"imap-login: Info: Login: user=<{sender.address}>" in ln
    ]
    assert "method=XOAUTH2" in login and ", TLS," in login
    # Dovecot asked the token server about the token relayd presented over IMAP.
    [token] = server.tokens_of(sender.address)
    assert server.introspections(token) >= 2  # SMTP (through Postfix's SASL) and IMAP
    [(flags, _, copy)] = fetch_all(mail_world, sender, "Sent")
    assert copy == data and "\\Seen" in flags
    assert setup.relayd.stop() == 0
    assert token not in setup.relayd.log()


def test_refused_xoauth2_token_is_reported_as_refused(
    mail_world: MailWorld, new_mailbox: NewMailbox
) -> None:
    """Dovecot answers a bad token with an error challenge; relayd answers it, so the failure
    is "refused" (the copy waits for a good token), never a timeout that looks like "down"."""
    server = mail_world.oauth
    server.add_client(OAUTH_CLIENT, OAUTH_SECRET)
    sender, other = new_mailbox("oauthbad"), new_mailbox("other")
    imap = ImapServer(
        "127.0.0.1",
        mail_world.imaps_port,
        TlsMode.IMPLICIT,
        mail_world.pki.ca_cert,
        None,
        None,
        None,
    )
    account = AccountConfig(
        address=sender.address,
        tenant="t",
        provider="custom",
        username=sender.address,
        password=None,
        oauth=OAuthConfig(flow="refresh_token"),
        smtp=None,
        imap=imap,
        limits=Limits(),
        sent_copy=SentCopy.AUTO,
        from_name=None,
        aliases=(),
        capture_path=None,
        where="test",
    )

    async def attempt(token: str) -> ImapFailure | None:
        async def source(_: object) -> str:
            return token

        session = ImapSession(account, token_source=source)
        try:
            await session.open()
        except ImapError as err:
            return err.kind
        await session.logout()
        return None

    good = server.issue_access_token(sender.address, OAUTH_CLIENT)
    assert asyncio.run(attempt(good)) is None
    for bad in ("at-bogus", server.issue_access_token(other.address, OAUTH_CLIENT)):
        assert asyncio.run(attempt(bad)) is ImapFailure.LOGIN_REFUSED


# -- the folder: \Sent special-use (RFC 6154), or imap.sent_folder -------------------------------


def test_folder_flagged_sent_under_another_name_is_found(
    mail_world: MailWorld, second_world: MailWorld, relayd_setup: RelaydSetupFactory, tmp_path: Path
) -> None:
    address = second_world.add_user("french", "pw-french-1")
    sender = Mailbox("french", address, "pw-french-1")
    rcpt_address = second_world.add_user("rcpt-fr", "pw-rcpt")
    tenant = tenant_with_imap(second_world, second_world, tmp_path / "secrets", sender)
    setup = relayd_setup({"t": tenant}, may_send_as=[sender.address])
    setup.relayd.start()
    _, data = submit(setup, sender, rcpt_address, "flagged folder")
    [(flags, _, copy)] = wait_for_copies(second_world, sender, FRENCH_SENT, 1)
    assert copy == data and "\\Seen" in flags
    assert fetch_all(second_world, sender, EXPLICIT) == []
    log = setup.relayd.wait_for_log("Sent folder is")
    assert '"&AMk-l&AOk-ments envoy&AOk-s"' in log  # found by its \Sent flag, mUTF-7
    assert setup.relayd.stop() == 0


def test_explicit_sent_folder_overrides_the_flagged_one(
    mail_world: MailWorld, second_world: MailWorld, relayd_setup: RelaydSetupFactory, tmp_path: Path
) -> None:
    address = second_world.add_user("explicit", "pw-explicit-1")
    sender = Mailbox("explicit", address, "pw-explicit-1")
    rcpt_address = second_world.add_user("rcpt-ex", "pw-rcpt")
    tenant = tenant_with_imap(
        second_world, second_world, tmp_path / "secrets", sender, sent_folder=EXPLICIT
    )
    setup = relayd_setup({"t": tenant}, may_send_as=[sender.address])
    setup.relayd.start()
    _, data = submit(setup, sender, rcpt_address, "explicit folder")
    [(flags, _, copy)] = wait_for_copies(second_world, sender, EXPLICIT, 1)
    assert copy == data and "\\Seen" in flags
    assert fetch_all(second_world, sender, FRENCH_SENT) == []
    assert "Sent folder is" not in setup.relayd.log()  # no LIST needed
    assert setup.relayd.stop() == 0


# -- auto on providers that file SMTP mail in Sent themselves: no IMAP at all -------------------


class ConnectionRecorder:
    """A listening socket that counts the connections made to it (and says nothing)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


@pytest.mark.parametrize("provider", ["gmail", "microsoft365"])
def test_auto_on_a_provider_that_files_its_own_copy_makes_no_imap_connection(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    tmp_path: Path,
    provider: str,
) -> None:
    sender, rcpt = new_mailbox(f"{provider}-"), new_mailbox("rcpt")
    recorder = ConnectionRecorder()
    try:
        secret = write_secret(tmp_path / "secrets" / sender.name, sender.password)
        tenant = {
            "provider": provider,
            # The preset's servers, pointed at the real Postfix and at the recorder.
            "smtp": {
                "host": "127.0.0.1",
                "port": mail_world.smtp_starttls_port,
                "tls": "starttls",
                "ca_file": str(mail_world.pki.ca_cert),
            },
            "imap": {"host": "127.0.0.1", "port": recorder.port, "tls": "implicit"},
            "sent_copy": "auto",
            "accounts": [{"address": sender.address, "password": {"file": str(secret)}}],
        }
        setup = relayd_setup({"t": tenant}, may_send_as=[sender.address])
        setup.relayd.start()
        submit(setup, sender, rcpt.address, f"no copy via {provider}")
        mail_world.wait_for_messages(rcpt.name, 1)
        setup.relayd.wait_for_log("status=delivered")
        # Delivered and gone: it never entered copy/, so no copy can ever be attempted ...
        wait_until(lambda: not any(spooled(setup.dir / "state").values()), "empty spool")
        assert copy_queue(setup) == []
        # ... and after a clean stop (which drains the filing stage), still no connection.
        assert setup.relayd.stop() == 0
        assert recorder.accepted == 0
        assert "Sent copy" not in setup.relayd.log()
        assert fetch_all(mail_world, sender, "Sent") == []
    finally:
        recorder.close()


# -- IMAP down during delivery -------------------------------------------------------------------


def test_imap_down_during_delivery_copy_follows_once_imap_is_back(
    mail_world: MailWorld,
    second_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    tmp_path: Path,
) -> None:
    sender, rcpt = new_mailbox("imapdown"), new_mailbox("rcpt")
    # The same mailbox on the second world, which serves this account's IMAP only.
    second_world.add_user(sender.address, sender.password)
    tenant = tenant_with_imap(mail_world, second_world, tmp_path / "secrets", sender)
    setup = relayd_setup({"t": tenant}, may_send_as=[sender.address])
    second_world.stop_dovecot()
    try:
        setup.relayd.start()
        queue_id, data = submit(setup, sender, rcpt.address, "while imap is down")
        mail_world.wait_for_messages(rcpt.name, 1)
        setup.relayd.wait_for_log("Sent copy deferred", count=2)
        # Delivered once; the copy waits in copy/, not in the delivery queues.
        assert copy_queue(setup) == [queue_id]
        assert spooled(setup.dir / "state") == {
            "incoming": [],
            "active": [],
            "deferred": [],
            "hold": [],
        }
        # Other mail is not held up meanwhile.
        submit(setup, sender, rcpt.address, "second while imap is down")
        mail_world.wait_for_messages(rcpt.name, 2)
    finally:
        second_world.start_dovecot()
    found = wait_for_copies(second_world, sender, FRENCH_SENT, 2)
    assert sorted(copy for _, _, copy in found) == sorted(
        [data, message(sender.address, rcpt.address, "second while imap is down")]
    )
    wait_until(lambda: copy_queue(setup) == [], "copy queue drained")
    assert setup.relayd.stop() == 0
    # The upstream saw each message once: one delivery line each, two messages in the INBOX.
    log = setup.relayd.log()
    assert log.count("status=delivered") == 2
    assert len(mail_world.messages(rcpt.name)) == 2
    assert len(fetch_all(second_world, sender, FRENCH_SENT)) == 2


# -- a crash right after APPEND ------------------------------------------------------------------


def test_killed_right_after_append_still_exactly_one_copy(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sender, rcpt = new_mailbox("crash"), new_mailbox("rcpt")
    tenant = tenant_with_imap(mail_world, mail_world, tmp_path / "secrets", sender)
    setup = relayd_setup({"t": tenant}, may_send_as=[sender.address])
    # The daemon SIGKILLs itself after the APPEND's OK, before the spool hears of it.
    monkeypatch.setenv(FAULT_ENV, "after-append")
    setup.relayd.start()
    queue_id, data = submit(setup, sender, rcpt.address, "crash after append")
    assert setup.relayd.proc is not None
    assert setup.relayd.proc.wait(60) == -signal.SIGKILL
    [(_, _, copy)] = fetch_all(mail_world, sender, "Sent")
    assert copy == data
    assert copy_queue(setup) == [queue_id]  # the bookkeeping never happened
    # Restart with the fault still armed: were there a second APPEND, the daemon would die.
    setup.relayd.start()
    log = setup.relayd.wait_for_log("already there")
    assert "<crash-after-append@relayd.test>" in log
    wait_until(lambda: copy_queue(setup) == [], "copy queue drained")
    assert setup.relayd.proc.poll() is None
    assert setup.relayd.stop() == 0
    assert [c for _, _, c in fetch_all(mail_world, sender, "Sent")] == [data]
    assert len(mail_world.messages(rcpt.name)) == 1  # and the mail went out once


# -- one login for many messages -----------------------------------------------------------------


def test_hundred_messages_one_imap_login(
    mail_world: MailWorld, new_mailbox: NewMailbox, relayd_setup: RelaydSetupFactory, tmp_path: Path
) -> None:
    sender, rcpt = new_mailbox("bulk"), new_mailbox("rcpt")
    tenant = tenant_with_imap(mail_world, mail_world, tmp_path / "secrets", sender)
    setup = relayd_setup({"t": tenant}, may_send_as=[sender.address])
    setup.relayd.start()
    with smtplib.SMTP("127.0.0.1", setup.port, timeout=30) as smtp:
        smtp.login("app", setup.client_password)
        for i in range(100):
            smtp.sendmail(
                sender.address, [rcpt.address], message(sender.address, rcpt.address, f"bulk {i}")
            )
    # Waited for on disk, not over IMAP: the test's own IMAP logins would count too.
    mail_world.wait_for_messages(sender.name, 100, folder="Sent", timeout=120)
    assert imap_logins(mail_world, sender.address) == 1
    assert setup.relayd.stop() == 0
    assert imap_logins(mail_world, sender.address) == 1
    found = fetch_all(mail_world, sender, "Sent")
    assert len(found) == 100
    assert all("\\Seen" in flags for flags, _, _ in found)
    assert len({copy for _, _, copy in found}) == 100


# -- DSNs go into the INBOX over IMAP, never into Sent ------------------------------------------


def test_dsn_filed_in_inbox_over_imap(
    mail_world: MailWorld, new_mailbox: NewMailbox, relayd_setup: RelaydSetupFactory, tmp_path: Path
) -> None:
    sender, rcpt = new_mailbox("dsnimap"), new_mailbox("rcpt")
    refused = "nobody@elsewhere.test"
    tenant = tenant_with_imap(mail_world, mail_world, tmp_path / "secrets", sender)
    setup = relayd_setup({"t": tenant}, may_send_as=[sender.address])
    setup.relayd.start()
    data = message(sender.address, rcpt.address, "partly refused over imap")
    reply = send(
        setup.port,
        sender.address,
        [rcpt.address, refused],
        data,
        login=("app", setup.client_password),
    )
    queue_id = reply.rsplit(" ", 1)[1]
    [(flags, _, dsn)] = wait_for_copies(mail_world, sender, "INBOX", 1)
    assert b"report-type=delivery-status" in dsn
    assert f"Final-Recipient: rfc822; {refused}".encode() in dsn
    assert b"Auto-Submitted: auto-replied" in dsn
    assert queue_id.encode() in dsn
    assert "\\Seen" not in flags  # unread: the sender should notice it
    # The delivered part has its Sent copy; the DSN itself never lands in Sent.
    [(_, _, copy)] = wait_for_copies(mail_world, sender, "Sent", 1)
    assert copy == data
    log = setup.relayd.wait_for_log("non-delivery notification filed")
    assert "for the INBOX over IMAP" in log
    assert setup.relayd.stop() == 0
    # Not sent through SMTP: the upstream accepted one message only (to the recipient).
    assert log.count("status=delivered") == 1
    assert len(fetch_all(mail_world, sender, "Sent")) == 1


def test_dsn_goes_over_smtp_when_imap_refuses_the_login(
    mail_world: MailWorld, new_mailbox: NewMailbox, relayd_setup: RelaydSetupFactory, tmp_path: Path
) -> None:
    sender = new_mailbox("dsnfallback")
    wrong = write_secret(tmp_path / "secrets" / "wrong-imap", "not-the-imap-password")
    tenant = tenant_with_imap(mail_world, mail_world, tmp_path / "secrets", sender)
    tenant["imap"]["password"] = {"file": str(wrong)}
    setup = relayd_setup({"t": tenant}, may_send_as=[sender.address])
    setup.relayd.start()
    send(
        setup.port,
        sender.address,
        ["nobody@elsewhere.test"],
        message(sender.address, "nobody@elsewhere.test", "refused, imap refused too"),
        login=("app", setup.client_password),
    )
    # IMAP says no to the login, so the DSN takes the SMTP way: the account to itself.
    [dsn] = mail_world.wait_for_messages(sender.name, 1, timeout=30)
    assert b"Final-Recipient: rfc822; nobody@elsewhere.test" in dsn
    log = setup.relayd.wait_for_log("goes out over SMTP instead")
    assert "AUTHENTICATIONFAILED" in log
    assert setup.relayd.stop() == 0
    assert fetch_all(mail_world, sender, "Sent") == []  # nothing was delivered: no copy
