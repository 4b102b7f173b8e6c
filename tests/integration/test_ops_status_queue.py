"""`relayd status` and `relayd queue ...` against a running daemon and a stopped one."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mailworld.world import MailWorld

from relayd.spool.accounts import AccountStore

from .conftest import NewMailbox, RelaydSetupFactory, RelayFor, custom_tenant
from .ops_cli import relayd_cli, relayd_json, wait_until
from .relayd_proc import free_port
from .test_relay_delivery import message, send, spooled

pytestmark = pytest.mark.integration

SLOW_RETRY = {"first": "1h", "max": "2h", "give_up_after": "5d"}


def _queue_id(reply: str) -> str:
    return reply.rsplit(" ", 1)[1]


def test_queue_commands_and_status_with_the_daemon_running(
    mail_world: MailWorld, new_mailbox: NewMailbox, relayd_setup: RelaydSetupFactory, tmp_path: Path
) -> None:
    sender, rcpt = new_mailbox("q"), new_mailbox("rcpt")
    # Nothing listens on this port: every attempt is deferred, for an hour.
    tenant = custom_tenant(
        mail_world, tmp_path / "secrets", sender, port=free_port(), tls="starttls"
    )
    setup = relayd_setup({"t": tenant}, may_send_as=[sender.address], retry=SLOW_RETRY)
    setup.relayd.start()
    login = ("app", setup.client_password)
    state = setup.dir / "state"
    first = _queue_id(
        send(
            setup.port,
            sender.address,
            [rcpt.address],
            message(sender.address, rcpt.address, "first"),
            login=login,
        )
    )
    second = _queue_id(
        send(
            setup.port,
            sender.address,
            [rcpt.address],
            message(sender.address, rcpt.address, "second"),
            login=login,
        )
    )
    wait_until(
        lambda: sorted(spooled(state)["deferred"]) == sorted([first, second]),
        what="both messages deferred",
    )

    status = relayd_json(setup.config_path, "status")
    assert setup.relayd.proc is not None
    assert status["running"] and status["uptime"] >= 0 and status["pid"] == setup.relayd.proc.pid
    [account] = status["accounts"]
    assert account["address"] == sender.address
    assert account["state"] == "deferred" and account["queued"] == 2
    assert "Connect" in account["last_error"] or "connect" in account["last_error"]
    table = relayd_cli(setup.config_path, "status").stdout
    assert "running (pid" in table and sender.address in table and "deferred" in table

    listed = relayd_json(setup.config_path, "queue", "list", "--account", sender.address)
    assert [e["id"] for e in listed] == sorted([first, second])
    assert listed[0]["recipients"] == [rcpt.address] and listed[0]["queue"] == "deferred"
    shown = relayd_cli(setup.config_path, "queue", "show", first)
    assert shown.returncode == 0 and "Subject: first" in shown.stdout
    # Retried after `retry.first` (1 h, with its jitter): queue show says when, and why then.
    assert listed[0]["next_try_at"] > time.time() + 40 * 60
    assert listed[0]["waiting_for"] == "its next retry"
    assert "next attempt: " in shown.stdout and "(its next retry)" in shown.stdout

    assert relayd_cli(setup.config_path, "queue", "hold", first).returncode == 0
    assert spooled(state)["hold"] == [first]
    assert "(held by operator)" in relayd_cli(setup.config_path, "queue", "list").stdout
    assert relayd_cli(setup.config_path, "queue", "release", first).returncode == 0
    wait_until(lambda: first in spooled(state)["deferred"], what="released message deferred")
    deleted = relayd_cli(setup.config_path, "queue", "delete", second)
    assert deleted.returncode == 0, deleted.stderr
    assert not any(second in ids for ids in spooled(state).values())
    missing = relayd_cli(setup.config_path, "queue", "delete", second)
    assert missing.returncode == 1 and "no such message" in missing.stderr

    # The upstream comes back: reload points the account at it, flush retries at once.
    setup.config["tenants"]["t"]["smtp"]["port"] = mail_world.smtp_starttls_port
    setup.rewrite_config()
    reloaded = relayd_cli(setup.config_path, "reload")
    assert reloaded.returncode == 0, reloaded.stderr
    flushed = relayd_cli(setup.config_path, "queue", "flush")
    assert flushed.returncode == 0 and "retried now" in flushed.stdout
    [got] = mail_world.wait_for_messages(rcpt.name, 1, timeout=30)
    assert b"Subject: first" in got
    wait_until(lambda: not any(spooled(state).values()), what="an empty spool")
    status = relayd_json(setup.config_path, "status")
    assert status["accounts"][0]["state"] == "ok"
    assert status["accounts"][0]["last_success_at"] is not None
    assert setup.relayd.stop() == 0


def test_paused_account_status_and_release_with_the_daemon_stopped(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
    sender, rcpt = new_mailbox("p"), new_mailbox("rcpt")
    wrong = "not-the-password-123"
    setup = relay_for(sender, password=wrong)
    setup.relayd.start()
    login = ("app", setup.client_password)
    state = setup.dir / "state"
    held = _queue_id(
        send(
            setup.port,
            sender.address,
            [rcpt.address],
            message(sender.address, rcpt.address, "held"),
            login=login,
        )
    )
    setup.relayd.wait_for_log("ALERT account paused", timeout=30)
    doomed = _queue_id(
        send(
            setup.port,
            sender.address,
            [rcpt.address],
            message(sender.address, rcpt.address, "doomed"),
            login=login,
        )
    )
    wait_until(lambda: sorted(spooled(state)["hold"]) == sorted([held, doomed]), what="held")
    live = relayd_json(setup.config_path, "status")
    assert live["accounts"][0]["state"] == "paused"
    # Held by the pause, not by a timer of its own: queue show names the pause and the
    # probe that will look again.
    entry = relayd_json(setup.config_path, "queue", "show", held)
    assert entry["queue"] == "hold"
    assert entry["waiting_for"].startswith("account paused (credentials refused: 535")
    assert "held until its credentials are fixed" in entry["waiting_for"]
    health = AccountStore(state).load(sender.address)
    assert health.paused and health.retry_at > time.time()
    assert entry["next_try_at"] == health.retry_at
    shown = relayd_cli(setup.config_path, "queue", "show", held).stdout
    assert "next attempt: " in shown and "account paused (credentials refused" in shown
    assert setup.relayd.stop() == 0

    # Stopped: status is read from the state directory.
    table = relayd_cli(setup.config_path, "status")
    assert table.returncode == 0, table.stderr
    assert "not running" in table.stdout
    assert "paused: credentials refused" in table.stdout
    assert f"relayd queue release --account {sender.address}" in table.stdout
    assert "hint:" not in table.stdout and wrong not in table.stdout
    offline = relayd_json(setup.config_path, "status")
    assert not offline["running"] and offline["accounts"][0]["queued"] == 2
    assert offline["queues"]["hold"] == 2

    deleted = relayd_cli(setup.config_path, "queue", "delete", doomed)
    assert deleted.returncode == 0 and "not running" in deleted.stdout
    # The provider now takes the configured password; release the account while stopped.
    mail_world.set_password(sender.name, wrong)
    released = relayd_cli(setup.config_path, "queue", "release", "--account", sender.address)
    assert released.returncode == 0, released.stderr
    assert "not running" in released.stdout and "1 held messages" in released.stdout
    assert spooled(state)["incoming"] == [held]
    setup.relayd.start()
    [got] = mail_world.wait_for_messages(rcpt.name, 1, timeout=30)
    assert b"Subject: held" in got
    assert relayd_json(setup.config_path, "status")["accounts"][0]["state"] == "ok"
    assert setup.relayd.stop() == 0


def test_release_account_through_the_running_daemon(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor
) -> None:
    sender, rcpt = new_mailbox("r"), new_mailbox("rcpt")
    wrong = "also-not-the-password-9"
    setup = relay_for(sender, password=wrong)
    setup.relayd.start()
    send(
        setup.port,
        sender.address,
        [rcpt.address],
        message(sender.address, rcpt.address, "release me"),
        login=("app", setup.client_password),
    )
    setup.relayd.wait_for_log("ALERT account paused", timeout=30)
    mail_world.set_password(sender.name, wrong)
    released = relayd_cli(setup.config_path, "queue", "release", "--account", sender.address)
    assert released.returncode == 0, released.stderr
    assert "resumed (was paused)" in released.stdout
    mail_world.wait_for_messages(rcpt.name, 1, timeout=30)
    assert setup.relayd.stop() == 0
