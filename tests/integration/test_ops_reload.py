"""Reload (SIGHUP and `relayd reload`): a new account flows without a restart; a broken YAML
is refused with its errors logged and the old config keeps serving."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from mailworld.world import MailWorld

from .conftest import NewMailbox, RelayFor, custom_tenant
from .ops_cli import relayd_cli
from .relayd_proc import free_port
from .test_relay_delivery import message, send

pytestmark = pytest.mark.integration


def test_sighup_adds_an_account_and_refuses_broken_yaml(
    mail_world: MailWorld, new_mailbox: NewMailbox, relay_for: RelayFor, tmp_path: Path
) -> None:
    first, second, rcpt = new_mailbox("one"), new_mailbox("two"), new_mailbox("rcpt")
    setup = relay_for(first)
    setup.relayd.start()
    login = ("app", setup.client_password)
    setup.config["tenants"]["other"] = custom_tenant(
        mail_world,
        tmp_path / "secrets",
        second,
        port=mail_world.smtp_implicit_port,
        tls="implicit",
    )
    setup.config["clients"]["app"]["may_send_as"] = [first.address, second.address]
    setup.rewrite_config()
    assert setup.relayd.proc is not None
    pid = setup.relayd.proc.pid
    setup.relayd.proc.send_signal(signal.SIGHUP)
    setup.relayd.wait_for_log("configuration reloaded")
    send(
        setup.port,
        second.address,
        [rcpt.address],
        message(second.address, rcpt.address, "new account"),
        login=login,
    )
    [got] = mail_world.wait_for_messages(rcpt.name, 1)
    assert b"Subject: new account" in got

    good = setup.config_path.read_text()
    setup.config_path.write_text(good + "tenants: [this is: not valid\n")
    setup.relayd.proc.send_signal(signal.SIGHUP)
    log = setup.relayd.wait_for_log("reload refused, old config still serving")
    assert "line" in log.split("reload refused", 1)[1]  # the errors name their line
    by_command = relayd_cli(setup.config_path, "reload")
    assert by_command.returncode != 0 and "line" in by_command.stderr
    send(
        setup.port,
        first.address,
        [rcpt.address],
        message(first.address, rcpt.address, "old config"),
        login=login,
    )
    send(
        setup.port,
        second.address,
        [rcpt.address],
        message(second.address, rcpt.address, "still there"),
        login=login,
    )
    assert len(mail_world.wait_for_messages(rcpt.name, 3)) == 3
    assert setup.relayd.proc.pid == pid and setup.relayd.proc.poll() is None

    # `relayd reload` applies a fixed file the same way.
    setup.config_path.write_text(good)
    reloaded = relayd_cli(setup.config_path, "reload")
    assert reloaded.returncode == 0, reloaded.stderr
    assert setup.relayd.log().count("configuration reloaded") == 2
    assert setup.relayd.stop() == 0


def test_reload_without_a_daemon_says_so(new_mailbox: NewMailbox, relay_for: RelayFor) -> None:
    setup = relay_for(new_mailbox("none"))
    result = relayd_cli(setup.config_path, "reload")
    assert result.returncode == 1 and "not running" in result.stderr


def test_reload_prints_what_needs_a_restart(
    new_mailbox: NewMailbox, relay_for: RelayFor, tmp_path: Path
) -> None:
    """A listener added or removed, a metrics address: applied at the next start, and
    `relayd reload` says so instead of leaving the operator to guess from a silent port."""
    setup = relay_for(new_mailbox("restart"))
    setup.relayd.start()
    first = setup.config["listen"][0]
    added = {"address": f"127.0.0.1:{free_port()}", "auth": "required", "tls": "none"}
    setup.config["listen"] = [added]  # the running one removed, a new one added
    setup.config["metrics"] = {"address": f"127.0.0.1:{free_port()}"}
    setup.rewrite_config()
    result = relayd_cli(setup.config_path, "reload")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"relayd reloaded {setup.config_path}"
    assert sorted(lines[1:]) == sorted(
        [
            f"needs a restart: {added['address']}: new listener, opened at the next start",
            f"needs a restart: {first['address']}: removed, closed at the next start",
            "needs a restart: metrics.address changed: takes effect at the next start",
        ]
    )
    # Still true on the next reload: the running listeners are what is compared.
    assert sorted(relayd_cli(setup.config_path, "reload").stdout.splitlines()) == sorted(lines)
    assert setup.relayd.stop() == 0
