"""systemd: the unit's hardening score, and the notify protocol of a real `relayd run`
(READY=1 after recovery, STATUS= with queue size, WATCHDOG=1 at half of WATCHDOG_USEC)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import NewMailbox, RelayFor
from .relayd_proc import REPO

pytestmark = pytest.mark.integration

UNIT = REPO / "systemd" / "relayd.service"


def test_unit_file_security_score_is_at_most_2() -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "scripts/test installs the systemd package for systemd-analyze"
    result = subprocess.run(
        [analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    found = re.search(r"Overall exposure level for relayd\.service: ([0-9.]+)", result.stdout)
    assert found, result.stdout + result.stderr
    score = float(found.group(1))
    print(f"systemd-analyze security --offline=yes {UNIT.name}: {score}")
    assert score <= 2.0
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "User=relayd",
        "StateDirectory=relayd",
        "ConfigurationDirectory=relayd",
        "WatchdogSec=",
    ):
        assert line in text
    assert "LoadCredential=" in text


def test_ready_status_and_watchdog_reach_the_notify_socket(
    new_mailbox: NewMailbox, relay_for: RelayFor, tmp_path: Path
) -> None:
    setup = relay_for(new_mailbox("sd"))
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(1.0)
        env = dict(os.environ, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="1000000")
        env.pop("WATCHDOG_PID", None)
        with open(setup.relayd.log_path, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "relayd", "-c", str(setup.config_path), "run"],
                stdout=log,
                stderr=log,
                cwd=REPO,
                env=env,
                start_new_session=True,
            )
        try:
            seen: list[str] = []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                text = " ".join(seen)
                if "READY=1" in text and "WATCHDOG=1" in text and "queued (" in text:
                    break
                try:
                    seen.append(sock.recv(4096).decode())
                except TimeoutError:
                    continue
            text = " ".join(seen)
            assert "READY=1" in text and "WATCHDOG=1" in text, seen
            assert re.search(r"STATUS=0 queued \(0 deferred, 0 held\)", text), seen
            ready = next(i for i, m in enumerate(seen) if "READY=1" in m)
            assert "spool recovered" in setup.relayd.log()  # recovery logged before READY
            assert (setup.dir / "state" / "control.sock").exists()
            assert ready == 0
        finally:
            proc.terminate()
            assert proc.wait(40) == 0
