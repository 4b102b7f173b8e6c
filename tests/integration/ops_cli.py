"""Running ``relayd COMMAND`` as the operator would, for the ops tests."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .relayd_proc import REPO


def relayd_cli(
    config: Path, *args: str, stdin: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "relayd", "-c", str(config), *args],
        input=stdin,
        capture_output=True,
        cwd=REPO,
        timeout=timeout,
        check=False,
    )
    return subprocess.CompletedProcess(
        proc.args,
        proc.returncode,
        proc.stdout.decode(errors="replace"),
        proc.stderr.decode(errors="replace"),
    )


def relayd_json(config: Path, *args: str) -> Any:
    result = relayd_cli(config, *args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def wait_until(check: Any, timeout: float = 30, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")
