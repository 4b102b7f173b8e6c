"""Alerts (one email through alerts.via, one webhook POST, once per incident) and the
Prometheus endpoint, against the real mail world."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mailworld.world import MailWorld

from .conftest import Mailbox, NewMailbox, RelaydSetupFactory, Webhook
from .relayd_proc import free_port, write_secret
from .test_relay_delivery import message, send

pytestmark = pytest.mark.integration


def _account(dir_: Path, mailbox: Mailbox, password: str | None = None) -> dict[str, Any]:
    secret = write_secret(dir_ / "secrets" / mailbox.name, password or mailbox.password)
    return {"address": mailbox.address, "password": {"file": str(secret)}}


def _tenant(
    world: MailWorld, accounts: list[dict[str, Any]], port: int | None = None
) -> dict[str, Any]:
    return {
        "provider": "custom",
        "smtp": {
            "host": "127.0.0.1",
            "port": port or world.smtp_starttls_port,
            "tls": "starttls",
            "ca_file": str(world.pki.ca_cert),
        },
        "accounts": accounts,
    }


def _wait(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_paused_account_raises_one_alert_email_and_one_webhook_post(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    tmp_path: Path,
    webhook: Webhook,
) -> None:
    url, posts = webhook
    broken, via, ops, rcpt = (new_mailbox(p) for p in ("broken", "via", "ops", "rcpt"))
    tenant = _tenant(
        mail_world, [_account(tmp_path, broken, "wrong-password-1"), _account(tmp_path, via)]
    )
    setup = relayd_setup({"acme": tenant}, may_send_as=[broken.address])
    setup.config["alerts"] = {"via": via.address, "email": ops.address, "webhook": url}
    setup.rewrite_config()
    setup.relayd.start()
    send(
        setup.port,
        broken.address,
        [rcpt.address],
        message(broken.address, rcpt.address, "held"),
        login=("app", setup.client_password),
    )
    [alert] = mail_world.wait_for_messages(ops.name, 1, timeout=30)
    _wait(lambda: len(posts) >= 1, "the webhook POST")
    assert b"Subject: [relayd] account " + broken.address.encode() + b" paused" in alert
    assert b"From: relayd <" + via.address.encode() + b">" in alert
    assert b"Auto-Submitted: auto-generated" in alert
    assert f"sasl_username={via.address}" in mail_world.postfix_log()
    [post] = posts
    assert post["kind"] == "account_paused" and post["account"] == broken.address
    assert post["tenant"] == "acme" and "535" in post["detail"]
    # Paused: new mail is held, yet the incident stays one alert (a settling pause, not a
    # timing assertion: nothing more may arrive, however long one waits).
    send(
        setup.port,
        broken.address,
        [rcpt.address],
        message(broken.address, rcpt.address, "held 2"),
        login=("app", setup.client_password),
    )
    time.sleep(3)
    assert len(mail_world.messages(ops.name)) == 1 and len(posts) == 1
    assert setup.relayd.stop() == 0
    setup.relayd.start()  # the incident survives a restart: still one alert
    time.sleep(3)
    assert len(mail_world.messages(ops.name)) == 1 and len(posts) == 1
    assert mail_world.messages(rcpt.name) == []
    assert setup.relayd.stop() == 0


def test_no_alert_email_through_another_tenants_mailbox(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    tmp_path: Path,
    webhook: Webhook,
) -> None:
    url, posts = webhook
    broken, via, ops = new_mailbox("broken"), new_mailbox("via"), new_mailbox("ops")
    setup = relayd_setup(
        {
            "a": _tenant(mail_world, [_account(tmp_path, broken, "wrong-password-2")]),
            "b": _tenant(mail_world, [_account(tmp_path, via)]),
        },
        may_send_as=[broken.address],
    )
    setup.config["alerts"] = {"via": via.address, "email": ops.address, "webhook": url}
    setup.rewrite_config()
    setup.relayd.start()
    send(
        setup.port,
        broken.address,
        [ops.address],
        message(broken.address, ops.address, "held"),
        login=("app", setup.client_password),
    )
    _wait(lambda: len(posts) >= 1, "the webhook POST")
    log = setup.relayd.wait_for_log("alert email not sent")
    assert "relayd sends no news about tenant a" in log
    assert posts[0]["tenant"] == "a"
    assert mail_world.messages(ops.name) == []
    assert setup.relayd.stop() == 0


def test_a_tenants_own_alerts_reach_its_admin_and_its_webhook(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    tmp_path: Path,
    webhook: Webhook,
    tenant_webhook: Webhook,
) -> None:
    url, posts = webhook
    tenant_url, tenant_posts = tenant_webhook
    broken, via, admin, other = (new_mailbox(p) for p in ("broken", "via", "admin", "other"))
    acme = _tenant(
        mail_world, [_account(tmp_path, broken, "wrong-password-3"), _account(tmp_path, via)]
    )
    # The tenant's webhook URL is a secret value, here a file beside the config.
    acme["alerts"] = {
        "via": via.address,
        "email": admin.address,
        "webhook": {"file": str(write_secret(tmp_path / "secrets" / "acme-hook", tenant_url))},
    }
    globex = _tenant(mail_world, [_account(tmp_path, other, "wrong-password-4")])
    setup = relayd_setup(
        {"acme": acme, "globex": globex}, may_send_as=[broken.address, other.address]
    )
    setup.config["alerts"] = {"webhook": url}
    setup.rewrite_config()
    setup.relayd.start()
    for sender in (broken, other):
        send(
            setup.port,
            sender.address,
            [admin.address],
            message(sender.address, admin.address, "held"),
            login=("app", setup.client_password),
        )
    _wait(lambda: len(posts) >= 2, "the top-level webhook POSTs")
    [alert] = mail_world.wait_for_messages(admin.name, 1, timeout=30)
    assert b"Subject: [relayd] account " + broken.address.encode() + b" paused" in alert
    assert b"From: relayd <" + via.address.encode() + b">" in alert
    # The top-level channel hears about both tenants, acme's own only about acme.
    assert sorted(p["account"] for p in posts) == sorted([broken.address, other.address])
    assert [(p["tenant"], p["account"]) for p in tenant_posts] == [("acme", broken.address)]
    time.sleep(2)  # nothing more arrives: globex's pause is not acme's business
    assert len(tenant_posts) == 1 and len(mail_world.messages(admin.name)) == 1
    assert tenant_url not in setup.relayd.log() and url not in setup.relayd.log()
    assert setup.relayd.stop() == 0


def _scrape(port: int, path: str) -> tuple[int, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return response.status, response.read().decode()


def test_metrics_and_healthz(
    mail_world: MailWorld, new_mailbox: NewMailbox, relayd_setup: RelaydSetupFactory, tmp_path: Path
) -> None:
    good, down, rcpt = new_mailbox("good"), new_mailbox("down"), new_mailbox("rcpt")
    metrics_port = free_port()
    setup = relayd_setup(
        {
            "ok": _tenant(mail_world, [_account(tmp_path, good)]),
            "down": _tenant(mail_world, [_account(tmp_path, down)], port=free_port()),
        },
        may_send_as=[good.address, down.address],
        retry={"first": "1h", "max": "2h", "give_up_after": "5d"},
    )
    setup.config["metrics"] = {"address": f"127.0.0.1:{metrics_port}"}
    setup.rewrite_config()
    setup.relayd.start()
    login = ("app", setup.client_password)
    send(
        setup.port,
        good.address,
        [rcpt.address],
        message(good.address, rcpt.address, "m1"),
        login=login,
    )
    send(
        setup.port,
        down.address,
        [rcpt.address],
        message(down.address, rcpt.address, "m2"),
        login=login,
    )
    mail_world.wait_for_messages(rcpt.name, 1)
    setup.relayd.wait_for_log("status=deferred")
    status, text = _scrape(metrics_port, "/metrics")
    assert status == 200
    assert "relayd_messages_accepted_total 2" in text
    assert f'relayd_recipients_total{{account="{good.address}",status="delivered"}} 1' in text
    assert f'relayd_recipients_total{{account="{down.address}",status="deferred"}} 1' in text
    # prometheus_client writes the labels of a sample in name order.
    assert f'relayd_queue_messages{{account="{down.address}",queue="deferred"}} 1' in text
    assert "relayd_delivery_latency_seconds_count 1" in text
    assert "# TYPE relayd_token_refreshes_total counter" in text
    assert "# TYPE relayd_imap_copies_total counter" in text
    assert _scrape(metrics_port, "/healthz") == (200, "ok\n")
    assert setup.relayd.stop() == 0
