"""relayd as a real process for the integration tests: started, stopped, killed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]

#: Every relayd log file written in this test session (the secret-grep test reads them all).
ALL_LOGS: list[Path] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_stats() -> Iterator[tuple[int, list[str]]]:
    """(pid, the /proc/PID/stat fields after the command name) of every process now."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        yield int(entry), fields


def live_group_members(pgid: int) -> list[int]:
    """Processes of a process group that are not zombies (dead, awaiting their parent)."""
    return [pid for pid, fields in proc_stats() if int(fields[2]) == pgid and fields[0] != "Z"]


def wait_for_group_exit(pgid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while live_group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


def spool_messages(directory: Path) -> list[Path]:
    """The messages in a spool queue directory: complete files (mode 0600), not the files
    accepting processes reserve in incoming/ for receptions (mode 0200)."""
    found = []
    for path in directory.iterdir() if directory.is_dir() else ():
        try:
            if path.stat().st_mode & 0o400:
                found.append(path)
        except FileNotFoundError:
            continue  # moved on meanwhile
    return sorted(found)


def write_secret(path: Path, value: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")
    os.chmod(path, 0o600)
    return path


def write_config(path: Path, data: dict[str, object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class Relayd:
    """``relayd -c CONFIG run`` in its own process group, logging to a file."""

    def __init__(self, config_path: Path, port: int, log_path: Path) -> None:
        self.config_path = config_path
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        ALL_LOGS.append(log_path)

    def start(self, timeout: float = 15.0) -> Relayd:
        """Start relayd and return once it has said READY=1, as systemd would wait for it.

        A listening port is not enough: the port is open before the signal handlers are in
        place, and a SIGHUP in between would end the process as its default action.
        """
        with tempfile.TemporaryDirectory(prefix="relayd-notify-") as directory:
            path = os.path.join(directory, "notify.sock")
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
                notify.bind(path)
                notify.settimeout(0.1)
                self._spawn(dict(os.environ, NOTIFY_SOCKET=path))
                self._wait_ready(notify, timeout)
        return self

    def _spawn(self, env: dict[str, str]) -> None:
        for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relayd", "-c", str(self.config_path), "run"],
            stdout=log,
            stderr=log,
            cwd=REPO,
            env=env,
            start_new_session=True,
        )
        log.close()

    def _wait_ready(self, notify: socket.socket, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"relayd exited {self.proc.returncode}:\n{self.log()}")
            try:
                if b"READY=1" in notify.recv(4096).split(b"\n"):
                    return
            except TimeoutError:
                continue
        raise AssertionError(f"relayd did not say READY=1 on {self.port}:\n{self.log()}")

    def stop(self, timeout: float = 40.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"relayd did not stop on SIGTERM:\n{self.log()}") from None

    def kill(self) -> None:
        """SIGKILL to the whole process group: a power cut, as far as relayd can tell."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        # The accepting processes die a moment after the main one, and hold the listening
        # socket until then: a restart must not connect to the dying instance.
        wait_for_group_exit(self.proc.pid)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, needle: str, timeout: float = 20.0, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if text.count(needle) >= count:
                return text
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} x{count} not in relayd log:\n{self.log()[-4000:]}")
