"""Delivery through the HTTP send APIs (SPEC "Transports"): Microsoft Graph ``sendMail`` and
the Gmail API ``messages.send``, against the suite's HTTPS endpoints of both, which check
every bearer token and its scope at the suite's OAuth server, deliver into the real Dovecot
and file the Sent copy themselves.
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from mailworld.oauth_server import OAuthServer
from mailworld.send_apis import Injected, SendApi
from mailworld.world import MailWorld

from relayd.oauth.store import StoredTokens, new_consent_id

from .conftest import NewMailbox, RelaydSetup, RelaydSetupFactory, Webhook
from .ops_cli import relayd_cli, relayd_json, wait_until
from .relayd_proc import write_secret
from .test_oauth import (
    APP_CLIENT,
    APP_SECRET,
    GOOGLE_CLIENT,
    GOOGLE_SECRET,
    MS_CLIENT,
    oauth,  # noqa: F401 - the fixture
    seed,
    start_auth,
    store_of,
)
from .test_relay_delivery import spooled

pytestmark = pytest.mark.integration

SA_EMAIL = "relayd-sender@relayd-test.iam.gserviceaccount.com"
_DOVECOT_ADDED = (b"return-path:", b"delivered-to:", b"received:")


@pytest.fixture
def graph(mail_world: MailWorld) -> Iterator[SendApi]:
    api = SendApi(mail_world, "graph")
    api.start()
    yield api
    api.stop()


@pytest.fixture
def gmail(mail_world: MailWorld) -> Iterator[SendApi]:
    api = SendApi(mail_world, "gmail")
    api.start()
    yield api
    api.stop()


def graph_tenant(
    world: MailWorld,
    server: OAuthServer,
    api: SendApi,
    secrets: Path,
    *,
    delegated: list[str],
    app_only: tuple[str, ...] = (),
    limits: dict[str, Any] | None = None,
) -> dict[str, Any]:
    secret = write_secret(secrets / "ms-app-secret", APP_SECRET)
    app_oauth = {
        "flow": "client_credentials",
        "client_id": APP_CLIENT,
        "client_secret": {"file": str(secret)},
    }
    tenant: dict[str, Any] = {
        "provider": "microsoft365",
        "transport": "graph",
        "graph_url": api.url,
        "oauth": {
            "client_id": MS_CLIENT,
            "authority": server.authority("contoso"),
            "ca_file": str(world.pki.ca_cert),
        },
        "accounts": [{"address": a, "oauth": {"flow": "delegated"}} for a in delegated]
        + [{"address": a, "oauth": app_oauth} for a in app_only],
    }
    if limits:
        tenant["limits"] = limits
    return tenant


def gmail_tenant(
    world: MailWorld,
    server: OAuthServer,
    api: SendApi,
    secrets: Path,
    *,
    installed: list[str],
    service_account: list[str],
) -> dict[str, Any]:
    client_secret = write_secret(secrets / "google-client", GOOGLE_SECRET)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server.add_service_account(
        SA_EMAIL,
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    sa_key = write_secret(
        secrets / "sa-key.json",
        json.dumps(
            {
                "type": "service_account",
                "project_id": "relayd-test",
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": SA_EMAIL,
                "client_id": "1234567890",
                "token_uri": server.google_token_url,
            }
        ),
    )
    sa_oauth = {"flow": "service_account", "service_account_key": {"file": str(sa_key)}}
    return {
        "provider": "google-workspace",
        "transport": "gmail_api",
        "gmail_url": api.url,
        "oauth": {
            "flow": "delegated",
            "client_id": GOOGLE_CLIENT,
            "client_secret": {"file": str(client_secret)},
            "token_url": server.google_token_url,
            "authority": server.google_auth_url,
            "ca_file": str(world.pki.ca_cert),
        },
        "accounts": [{"address": a} for a in installed]
        + [{"address": a, "oauth": sa_oauth} for a in service_account],
    }


def mime(
    sender: str, to: list[str], subject: str, *, cc: tuple[str, ...] = (), body: bytes = b""
) -> bytes:
    head = f"From: Sender <{sender}>\r\nTo: {', '.join(f'<{t}>' for t in to)}\r\n"
    if cc:
        head += f"Cc: {', '.join(cc)}\r\n"
    head += (
        f"Subject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '-')}.{time.time_ns()}@relayd.test>\r\n"
        "Date: Thu, 03 Dec 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    )
    return head.encode() + (body or "Grüße über die API.\r\n.leading dot\r\n".encode())


def submit(setup: RelaydSetup, sender: str, rcpts: list[str], data: bytes) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", setup.port, timeout=60) as smtp:
        smtp.ehlo("app.test")
        smtp.login("app", setup.client_password)
        smtp.mail(sender, ["BODY=8BITMIME"])
        for r in rcpts:
            code, msg = smtp.rcpt(r)
            assert code == 250, (code, msg)
        code, reply = smtp.data(data)
        return code, reply.decode()


def queued(setup: RelaydSetup, sender: str, rcpts: list[str], data: bytes) -> str:
    code, reply = submit(setup, sender, rcpts, data)
    assert code == 250, reply
    return reply.rsplit(" ", 1)[1]


def as_submitted(raw: bytes) -> bytes:
    """A message as Dovecot stored it, without the trace fields its delivery prepended,
    in the CRLF form it was submitted in."""
    lines = raw.replace(b"\r\n", b"\n").split(b"\n")
    i = 0
    while i < len(lines) and (
        lines[i].lower().startswith(_DOVECOT_ADDED) or (i and lines[i][:1] in (b" ", b"\t"))
    ):
        i += 1
    return b"\r\n".join(lines[i:])


def imap_logins(world: MailWorld, address: str) -> list[str]:
    return [ln for ln in world.dovecot_log().splitlines() if "imap-login" in ln and address in ln]


def answered(api: SendApi, address: str) -> list[int]:
    """The statuses the endpoint answered the mailbox's requests with, once it has answered
    them all (the mail reaches Dovecot before the answer reaches relayd)."""
    wait_until(lambda: all(r.status for r in api.requests(address)), timeout=10)
    return [r.status for r in api.requests(address)]


def empty_spool(setup: RelaydSetup) -> bool:
    return spooled(setup.dir / "state") == {
        "incoming": [],
        "active": [],
        "deferred": [],
        "hold": [],
    }


# -- delivery --------------------------------------------------------------------------------


def test_graph_delegated_and_app_only_deliver_byte_identical_with_the_endpoints_sent_copy(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,  # noqa: F811
    graph: SendApi,
    tmp_path: Path,
) -> None:
    alice, bob, rcpt = new_mailbox("gdel"), new_mailbox("gapp"), new_mailbox("rcpt")
    tenant = graph_tenant(
        mail_world,
        oauth,
        graph,
        tmp_path / "secrets",
        delegated=[alice.address],
        app_only=(bob.address,),
    )
    setup = relayd_setup({"ms": tenant}, may_send_as=[alice.address, bob.address])
    seed(setup, oauth, alice.address, MS_CLIENT)
    setup.relayd.start()
    sent = {
        a.address: mime(a.address, [rcpt.address], f"graph from {a.name}") for a in (alice, bob)
    }
    for address, data in sent.items():
        queued(setup, address, [rcpt.address], data)
    got = mail_world.wait_for_messages(rcpt.name, 2)
    assert sorted(as_submitted(m) for m in got) == sorted(sent.values())
    for a in (alice, bob):
        # Exactly one Sent copy each, the endpoint's (the service files it), none by relayd.
        [copy] = mail_world.wait_for_messages(a.name, 1, folder="Sent")
        assert copy.replace(b"\n", b"\r\n") == sent[a.address]
        assert imap_logins(mail_world, a.address) == []
        assert answered(graph, a.address) == [202]
    log = setup.relayd.wait_for_log("status=delivered", count=2)
    assert f"relay=127.0.0.1:{graph.url.rsplit(':', 1)[1]}" in log
    wait_until(lambda: empty_spool(setup))
    time.sleep(1.0)  # a Sent copy would have been started by now
    for a in (alice, bob):
        assert len(mail_world.messages(a.name, "Sent")) == 1
    assert not list((setup.dir / "state" / "spool" / "copy").glob("*"))
    assert setup.relayd.stop() == 0


def test_gmail_api_installed_app_and_service_account_deliver_byte_identical(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,  # noqa: F811
    gmail: SendApi,
    tmp_path: Path,
) -> None:
    carol, dave, rcpt = new_mailbox("ginst"), new_mailbox("gsa"), new_mailbox("rcpt")
    tenant = gmail_tenant(
        mail_world,
        oauth,
        gmail,
        tmp_path / "secrets",
        installed=[carol.address],
        service_account=[dave.address],
    )
    setup = relayd_setup({"g": tenant}, may_send_as=[carol.address, dave.address])
    seed(setup, oauth, carol.address, GOOGLE_CLIENT)
    setup.relayd.start()
    sent = {
        a.address: mime(a.address, [rcpt.address], f"gmail from {a.name}") for a in (carol, dave)
    }
    for address, data in sent.items():
        queued(setup, address, [rcpt.address], data)
    got = mail_world.wait_for_messages(rcpt.name, 2)
    assert sorted(as_submitted(m) for m in got) == sorted(sent.values())
    for a in (carol, dave):
        [copy] = mail_world.wait_for_messages(a.name, 1, folder="Sent")
        assert copy.replace(b"\n", b"\r\n") == sent[a.address]
        assert imap_logins(mail_world, a.address) == []
        assert answered(gmail, a.address) == [200]
    setup.relayd.wait_for_log("status=delivered", count=2)
    assert setup.relayd.stop() == 0


def test_envelope_is_authoritative_bcc_only_recipient_gets_it_header_only_address_does_not(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,  # noqa: F811
    graph: SendApi,
    tmp_path: Path,
) -> None:
    alice = new_mailbox("genv")
    to, hidden, outsider = new_mailbox("to"), new_mailbox("bcc"), new_mailbox("cconly")
    tenant = graph_tenant(mail_world, oauth, graph, tmp_path / "secrets", delegated=[alice.address])
    setup = relayd_setup({"ms": tenant}, may_send_as=[alice.address])
    seed(setup, oauth, alice.address, MS_CLIENT)
    setup.relayd.start()
    # The envelope: To and a Bcc-style recipient; the header names someone not in it.
    data = mime(alice.address, [to.address], "envelope rules", cc=(outsider.address,))
    queued(setup, alice.address, [to.address, hidden.address], data)
    [at_to] = mail_world.wait_for_messages(to.name, 1)
    [at_hidden] = mail_world.wait_for_messages(hidden.name, 1)
    setup.relayd.wait_for_log("status=delivered", count=2)
    time.sleep(0.5)
    assert mail_world.messages(outsider.name) == []
    # What recipients see: the Cc naming the outsider is replaced by an empty group; the
    # Bcc relayd added for the envelope-only recipient is gone (the service removes it).
    for got in (at_to, at_hidden):
        seen = as_submitted(got)
        assert b"Cc: undisclosed-recipients:;\r\n" in seen
        assert outsider.address.encode() not in seen and b"Bcc:" not in seen
        assert (
            seen.replace(b"Cc: undisclosed-recipients:;", b"Cc: " + outsider.address.encode())
            == data
        )
    [(_, recipients, request)] = graph.delivered()
    assert sorted(recipients) == sorted([to.address, hidden.address])
    assert request.startswith(f"Bcc: {hidden.address}\r\n".encode())
    assert "header recipients outside the envelope left out of the request" in setup.relayd.log()
    assert setup.relayd.stop() == 0


def test_bcc_only_recipients_with_matching_headers_keep_the_mime_byte_identical(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,  # noqa: F811
    gmail: SendApi,
    tmp_path: Path,
) -> None:
    carol, to, hidden = new_mailbox("gbcc"), new_mailbox("to"), new_mailbox("bcc")
    tenant = gmail_tenant(
        mail_world,
        oauth,
        gmail,
        tmp_path / "secrets",
        installed=[carol.address],
        service_account=[],
    )
    setup = relayd_setup({"g": tenant}, may_send_as=[carol.address])
    seed(setup, oauth, carol.address, GOOGLE_CLIENT)
    setup.relayd.start()
    data = mime(carol.address, [to.address], "blind copy")
    queued(setup, carol.address, [to.address, hidden.address], data)
    for box in (to, hidden):
        [got] = mail_world.wait_for_messages(box.name, 1)
        assert as_submitted(got) == data
    assert setup.relayd.stop() == 0


# -- replies mapped to outcomes ----------------------------------------------------------------


def test_401_refreshes_the_token_once_and_sends_once_more(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,  # noqa: F811
    graph: SendApi,
    tmp_path: Path,
) -> None:
    alice, rcpt = new_mailbox("g401"), new_mailbox("rcpt")
    tenant = graph_tenant(mail_world, oauth, graph, tmp_path / "secrets", delegated=[alice.address])
    setup = relayd_setup({"ms": tenant}, may_send_as=[alice.address])
    seed(setup, oauth, alice.address, MS_CLIENT)
    refreshes_before = oauth.count("refresh_token")
    setup.relayd.start()
    graph.inject(
        Injected(
            401,
            {
                "error": {
                    "code": "InvalidAuthenticationToken",
                    "message": "Lifetime validation failed",
                }
            },
            mailbox=alice.address,
        )
    )
    queued(setup, alice.address, [rcpt.address], mime(alice.address, [rcpt.address], "after 401"))
    mail_world.wait_for_messages(rcpt.name, 1)
    setup.relayd.wait_for_log("status=delivered")
    assert answered(graph, alice.address) == [401, 202]
    # One refresh for the first token, exactly one more after the 401.
    assert oauth.count("refresh_token") - refreshes_before == 2
    assert "attempts=1" in setup.relayd.log()
    assert setup.relayd.stop() == 0


def test_403_pauses_the_account_with_one_alert_naming_the_permission(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,  # noqa: F811
    graph: SendApi,
    webhook: Webhook,
    tmp_path: Path,
) -> None:
    bob, rcpt = new_mailbox("g403"), new_mailbox("rcpt")
    tenant = graph_tenant(
        mail_world, oauth, graph, tmp_path / "secrets", delegated=[], app_only=(bob.address,)
    )
    setup = relayd_setup({"ms": tenant}, may_send_as=[bob.address])
    url, posts = webhook
    setup.config["alerts"] = {"webhook": url}
    setup.rewrite_config()
    setup.relayd.start()
    denied = {
        "error": {
            "code": "ErrorAccessDenied",
            "message": "Access is denied. Check credentials and try again.",
        }
    }
    graph.inject(Injected(403, denied, mailbox=bob.address), times=5)
    queued(setup, bob.address, [rcpt.address], mime(bob.address, [rcpt.address], "forbidden"))
    setup.relayd.wait_for_log("ALERT account paused")
    [account] = relayd_json(setup.config_path, "status")["accounts"]
    assert account["state"] == "paused"
    assert "ErrorAccessDenied" in account["why"] and "Mail.Send" in account["why"]
    assert "relayd queue release" in account["fix"]
    # Paused: held, not retried and not probed on the retry schedule (retry.max is 2 s here).
    time.sleep(5.0)
    assert len(graph.requests(bob.address)) == 1
    assert spooled(setup.dir / "state")["hold"]
    alerts = [p for p in posts if "paused" in json.dumps(p)]
    assert len(alerts) == 1
    assert "application permission Mail.Send" in json.dumps(alerts[0])
    assert mail_world.messages(rcpt.name) == []
    # The administrator grants it; the operator releases the account: delivered.
    graph.state.injected.clear()
    relayd_cli(setup.config_path, "queue", "release", "--account", bob.address)
    mail_world.wait_for_messages(rcpt.name, 1)
    assert setup.relayd.stop() == 0


def test_400_invalid_recipient_bounces_with_the_providers_text_in_the_dsn(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,  # noqa: F811
    graph: SendApi,
    tmp_path: Path,
) -> None:
    alice = new_mailbox("g400")
    tenant = graph_tenant(mail_world, oauth, graph, tmp_path / "secrets", delegated=[alice.address])
    setup = relayd_setup({"ms": tenant}, may_send_as=[alice.address])
    seed(setup, oauth, alice.address, MS_CLIENT)
    setup.relayd.start()
    bad = "nobody@invalid.test"
    queued(setup, alice.address, [bad], mime(alice.address, [bad], "to nowhere"))
    # The DSN goes to the sender through the same account (the API), into its INBOX.
    [dsn] = mail_world.wait_for_messages(alice.name, 1)
    text = dsn.decode("utf-8", "replace")
    assert "ErrorInvalidRecipients" in text
    assert "is not resolved" in text
    assert "Status: 5.1.1" in text
    assert "status=bounced" in setup.relayd.log()
    assert setup.relayd.stop() == 0


def test_a_message_too_big_for_graph_is_refused_at_the_end_of_data(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,  # noqa: F811
    graph: SendApi,
    tmp_path: Path,
) -> None:
    alice, rcpt = new_mailbox("gbig"), new_mailbox("rcpt")
    tenant = graph_tenant(mail_world, oauth, graph, tmp_path / "secrets", delegated=[alice.address])
    setup = relayd_setup({"ms": tenant}, may_send_as=[alice.address])
    seed(setup, oauth, alice.address, MS_CLIENT)
    setup.relayd.start()
    line = b"x" * 998 + b"\r\n"
    big = mime(alice.address, [rcpt.address], "big", body=line * (3_500_000 // len(line)))
    assert len(big) > 3_400_000
    code, reply = submit(setup, alice.address, [rcpt.address], big)
    assert code == 552
    assert reply.startswith("5.3.4 ") and "Microsoft Graph" in reply and "3145728" in reply
    # Declared up front, it is refused at MAIL FROM (RFC 1870).
    with smtplib.SMTP("127.0.0.1", setup.port, timeout=30) as smtp:
        smtp.ehlo("app.test")
        smtp.login("app", setup.client_password)
        code, msg = smtp.mail(alice.address, [f"SIZE={len(big)}"])
        assert code == 552 and b"Microsoft Graph" in msg
    assert graph.requests() == []
    assert empty_spool(setup)
    # The route is known before MAIL FROM only when every route is Graph: EHLO says so.
    with smtplib.SMTP("127.0.0.1", setup.port, timeout=30) as smtp:
        smtp.ehlo("app.test")
        assert smtp.esmtp_features["size"] == "3145728"
    assert setup.relayd.stop() == 0


def test_a_timeout_after_the_request_was_read_defers_and_sends_once_more(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,  # noqa: F811
    graph: SendApi,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    alice, rcpt = new_mailbox("gtmo"), new_mailbox("rcpt")
    tenant = graph_tenant(mail_world, oauth, graph, tmp_path / "secrets", delegated=[alice.address])
    setup = relayd_setup({"ms": tenant}, may_send_as=[alice.address])
    seed(setup, oauth, alice.address, MS_CLIENT)
    monkeypatch.setenv("RELAYD_TEST_API_TIMEOUT", "2")
    graph.stall_seconds = 10.0
    setup.relayd.start()
    graph.inject(Injected(0, stall=True, mailbox=alice.address))
    queued(setup, alice.address, [rcpt.address], mime(alice.address, [rcpt.address], "no answer"))
    setup.relayd.wait_for_log("status=deferred", timeout=30)
    setup.relayd.wait_for_log("status=delivered", timeout=30)
    # The stalled request had been taken (it may have been sent: at-least-once), and the
    # retry sent it once more: two copies, never a third.
    mail_world.wait_for_messages(rcpt.name, 2)
    time.sleep(3.0)
    assert len(mail_world.messages(rcpt.name)) == 2
    assert len(graph.requests(alice.address)) == 2
    log = setup.relayd.log()
    assert re.search(r"status=deferred \(timeout during data: no answer from Microsoft Graph", log)
    assert setup.relayd.stop() == 0


def test_429_with_retry_after_holds_the_whole_lane_then_delivers_all(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,  # noqa: F811
    graph: SendApi,
    tmp_path: Path,
) -> None:
    alice, rcpt = new_mailbox("g429"), new_mailbox("rcpt")
    tenant = graph_tenant(mail_world, oauth, graph, tmp_path / "secrets", delegated=[alice.address])
    setup = relayd_setup({"ms": tenant}, may_send_as=[alice.address])
    seed(setup, oauth, alice.address, MS_CLIENT)
    setup.relayd.start()
    throttled = {
        "error": {
            "code": "ApplicationThrottled",
            "message": "Application is over its MailboxConcurrency limit.",
        }
    }
    graph.inject(Injected(429, throttled, {"Retry-After": "5"}, mailbox=alice.address))
    queued(setup, alice.address, [rcpt.address], mime(alice.address, [rcpt.address], "first"))
    # Once relayd has the 429 (its log says so), more mail for the mailbox waits with it.
    setup.relayd.wait_for_log("throttled by the provider")
    for i in range(5):
        queued(
            setup, alice.address, [rcpt.address], mime(alice.address, [rcpt.address], f"more {i}")
        )
    mail_world.wait_for_messages(rcpt.name, 6, timeout=40)
    [refused] = [r for r in graph.requests(alice.address) if r.status == 429]
    answered(graph, alice.address)
    later = [r for r in graph.requests(alice.address) if r.at > refused.answered_at]
    assert len(later) == 6
    gap = min(r.at for r in later) - refused.answered_at
    print(f"first request after the 429 with Retry-After: 5 came {gap:.2f} s later")
    assert gap >= 5.0
    assert all(r.status == 202 for r in later)
    assert setup.relayd.stop() == 0


def test_100_messages_to_one_graph_mailbox_never_exceed_4_concurrent_requests(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,  # noqa: F811
    graph: SendApi,
    tmp_path: Path,
) -> None:
    alice, rcpt = new_mailbox("g100"), new_mailbox("rcpt")
    tenant = graph_tenant(mail_world, oauth, graph, tmp_path / "secrets", delegated=[alice.address])
    setup = relayd_setup({"ms": tenant}, may_send_as=[alice.address])
    seed(setup, oauth, alice.address, MS_CLIENT)
    setup.relayd.start()
    with smtplib.SMTP("127.0.0.1", setup.port, timeout=60) as smtp:
        smtp.ehlo("app.test")
        smtp.login("app", setup.client_password)
        for i in range(100):
            smtp.sendmail(
                alice.address, [rcpt.address], mime(alice.address, [rcpt.address], f"n{i}")
            )
    mail_world.wait_for_messages(rcpt.name, 100, timeout=120)
    assert len(graph.requests(alice.address)) == 100
    peak = graph.max_concurrency(alice.address)
    assert 1 < peak <= 4, peak
    print(f"100 messages: peak {peak} concurrent requests at the Graph endpoint")
    assert setup.relayd.stop() == 0


def test_relayd_test_on_graph_and_gmail_api_accounts_gets_a_token_and_sends(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,  # noqa: F811
    graph: SendApi,
    gmail: SendApi,
    tmp_path: Path,
) -> None:
    alice, carol, rcpt = new_mailbox("tgr"), new_mailbox("tgm"), new_mailbox("rcpt")
    secrets = tmp_path / "secrets"
    setup = relayd_setup(
        {
            "ms": graph_tenant(mail_world, oauth, graph, secrets, delegated=[alice.address]),
            "g": gmail_tenant(
                mail_world, oauth, gmail, secrets, installed=[carol.address], service_account=[]
            ),
        },
        may_send_as=[alice.address, carol.address],
    )
    seed(setup, oauth, alice.address, MS_CLIENT)
    seed(setup, oauth, carol.address, GOOGLE_CLIENT)
    expected = {
        alice.address: (graph, "https://graph.microsoft.com/Mail.Send", "Microsoft Graph"),
        carol.address: (gmail, "https://www.googleapis.com/auth/gmail.send", "Gmail API"),
    }
    for address, (api, scope, label) in expected.items():
        result = relayd_cli(setup.config_path, "test", address, "--send-to", rcpt.address)
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        assert "[ok]   token" in out and scope in out
        assert f"[ok]   send   test message to <{rcpt.address}>" in out and label in out
        assert "IMAP" in out and "no IMAP" in out
        assert answered(api, address) in ([202], [200])
    got = mail_world.wait_for_messages(rcpt.name, 2)
    assert all(b"Subject: relayd test message" in m for m in got)
    for box in (alice, carol):
        assert len(mail_world.messages(box.name, "Sent")) == 1
        assert imap_logins(mail_world, box.address) == []


def test_switching_to_graph_with_smtp_tokens_needs_consent_for_graph_then_delivers(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,  # noqa: F811
    graph: SendApi,
    tmp_path: Path,
) -> None:
    alice, rcpt = new_mailbox("gsw"), new_mailbox("rcpt")
    tenant = graph_tenant(mail_world, oauth, graph, tmp_path / "secrets", delegated=[alice.address])
    setup = relayd_setup({"ms": tenant}, may_send_as=[alice.address])
    # What `relayd auth` stored while the account still used SMTP (its default scopes).
    store_of(setup).save(
        StoredTokens(
            address=alice.address,
            flow="delegated",
            refresh_token=oauth.issue_refresh_token(alice.address, MS_CLIENT),
            consent_id=new_consent_id(),
            updated_at=time.time(),
            scopes=[],
        )
    )
    setup.relayd.start()
    queued(setup, alice.address, [rcpt.address], mime(alice.address, [rcpt.address], "switched"))
    setup.relayd.wait_for_log("ALERT account paused")
    [account] = relayd_json(setup.config_path, "status")["accounts"]
    assert account["state"] == "needs consent"
    assert f"run `relayd auth {alice.address}` again for Graph" in account["why"]
    assert graph.requests() == []  # nothing offered to Graph with a token for Outlook SMTP

    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    auth = start_auth(setup, alice.address, "--device-code", env=env)
    try:
        assert auth.stdout is not None
        shown = ""
        while not re.search(r"^\s+[A-Z]{8}$", shown, re.M):
            line = auth.stdout.readline()
            assert line, f"relayd auth ended early:\n{shown}"
            shown += line
        code = re.search(r"^\s+([A-Z]{8})$", shown, re.M).group(1)  # type: ignore[union-attr]
        with oauth._lock:
            [device] = [d for d in oauth.state.devices.values() if d.user_code == code]
        # relayd auth asks for the account's transport's scope, not SMTP's.
        assert "https://graph.microsoft.com/Mail.Send" in device.scope.split()
        assert "https://outlook.office.com/SMTP.Send" not in device.scope
        oauth.approve_device_code(code, alice.address)
        rest, _ = auth.communicate(timeout=60)
    finally:
        if auth.poll() is None:
            auth.kill()
    assert auth.returncode == 0, shown + rest
    mail_world.wait_for_messages(rcpt.name, 1, timeout=30)
    assert answered(graph, alice.address) == [202]
    assert setup.relayd.stop() == 0


def test_gmail_token_without_the_send_scope_pauses_with_the_scope_to_grant(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,  # noqa: F811
    gmail: SendApi,
    tmp_path: Path,
) -> None:
    dave, rcpt = new_mailbox("gscope"), new_mailbox("rcpt")
    tenant = gmail_tenant(
        mail_world, oauth, gmail, tmp_path / "secrets", installed=[], service_account=[dave.address]
    )
    # Domain-wide delegation granted for another scope: the endpoint itself refuses the
    # token (no injected reply), as Gmail does with insufficientPermissions.
    tenant["accounts"][0]["oauth"]["scopes"] = ["https://www.googleapis.com/auth/gmail.readonly"]
    setup = relayd_setup({"g": tenant}, may_send_as=[dave.address])
    setup.relayd.start()
    queued(setup, dave.address, [rcpt.address], mime(dave.address, [rcpt.address], "no scope"))
    setup.relayd.wait_for_log("ALERT account paused")
    [account] = relayd_json(setup.config_path, "status")["accounts"]
    assert account["state"] == "paused"
    assert "insufficientPermissions" in account["why"]
    assert (
        "https://www.googleapis.com/auth/gmail.send under domain-wide delegation"
        in (account["why"])
    )
    assert answered(gmail, dave.address) == [403]
    assert mail_world.messages(rcpt.name) == []
    assert spooled(setup.dir / "state")["hold"]
    assert setup.relayd.stop() == 0
