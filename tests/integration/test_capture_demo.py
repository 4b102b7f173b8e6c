"""The capture demo the README starts with (etc/relayd.local.yaml), run as shipped: only its
state directory, Maildir and port are moved into the test's directory. ``relayd status``
shows where mail goes before any has been sent, and each sender once it has."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest

from .ops_cli import relayd_cli, relayd_json, wait_until
from .relayd_proc import REPO, Relayd, free_port

pytestmark = pytest.mark.integration

DEMO = REPO / "etc" / "relayd.local.yaml"


def _demo(tmp_path: Path) -> tuple[Relayd, Path, Path]:
    port = free_port()
    text = DEMO.read_text()
    assert "/tmp/relayd-local" in text and "127.0.0.1:2525" in text
    text = text.replace("/tmp/relayd-local", str(tmp_path / "demo"))
    text = text.replace("127.0.0.1:2525", f"127.0.0.1:{port}")
    path = tmp_path / "relayd.local.yaml"
    path.write_text(text)
    return Relayd(path, port, tmp_path / "relayd.log"), path, tmp_path / "demo" / "capture"


def _send(port: int, sender: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.sendmail(
            sender,
            ["you@example.org"],
            f"From: <{sender}>\r\nTo: <you@example.org>\r\nSubject: {subject}\r\n\r\nhi\r\n",
        )


def test_status_on_the_capture_demo_shows_its_route_and_each_sender(tmp_path: Path) -> None:
    relayd, config, maildir = _demo(tmp_path)
    relayd.start()
    try:
        table = relayd_cli(config, "status")
        assert table.returncode == 0, table.stderr
        # Before any mail: not "(no accounts configured)", but where mail would go.
        assert "no accounts configured" not in table.stdout
        assert f"* -> tenant local: capture into the Maildir {maildir}" in table.stdout
        [route] = relayd_json(config, "status")["routes"]
        assert (route["tenant"], route["domains"], route["provider"]) == ("local", ["*"], "capture")

        _send(relayd.port, "me@example.com", "first")
        _send(relayd.port, "cron@example.net", "second")
        wait_until(lambda: len(list((maildir / "new").iterdir())) == 2, what="two captured")
        report = wait_until(
            lambda: (
                (r := relayd_json(config, "status"))["accounts"]
                and all(a["last_success_at"] for a in r["accounts"])
                and len(r["accounts"]) == 2
                and r
            ),
            what="both senders in the status",
        )
        senders = {a["address"]: a for a in report["accounts"]}
        assert set(senders) == {"me@example.com", "cron@example.net"}
        for row in senders.values():
            assert row["state"] == "ok" and row["tenant"] == "local"
            assert row["route"] == "tenants.local.domains: *"
        assert report["routes"][0]["senders_seen"] == 2
        text = relayd_cli(config, "status").stdout
        assert "me@example.com" in text and "cron@example.net" in text
        assert "(2 senders seen)" in text
    finally:
        assert relayd.stop() == 0
    # With the daemon stopped, the same from the disk alone.
    offline = relayd_json(config, "status")
    assert not offline["running"]
    assert {a["address"] for a in offline["accounts"]} == {"me@example.com", "cron@example.net"}
