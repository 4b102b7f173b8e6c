"""The kill -9 campaign: mail that got a 250 survives any crash (RFC 5321 §6.1).

    python3 benchmarks/crash.py [--cycles 200] [--senders 4]

relayd runs on the capture provider (nothing leaves the machine) while a few SMTP clients
send numbered messages as fast as they can; at a random moment the whole process group is
killed with SIGKILL, and relayd is started again on the same spool, `--cycles` times. At the
end relayd runs until its spool is empty, and every message a client heard 250 for must be
in the capture Maildir (at least once: a crash after the delivery but before its bookkeeping
may deliver twice). Prints the counts; exits 1 if any acknowledged message was lost.

Not a test (it takes minutes); the integration tests cover each crash point one by one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SENDER = "crash@relayd.crash"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> bool:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


class Campaign:
    def __init__(self, base: Path, senders: int, pause: float) -> None:
        self.base = base
        self.senders = senders
        self.pause = pause  # between one sender's messages: the spool stays drainable
        self.port = free_port()
        self.capture = base / "capture"
        self.config = base / "relayd.yaml"
        self.config.write_text(
            json.dumps(
                {
                    "state_directory": str(base / "state"),
                    "log_level": "warning",
                    "listen": [
                        {"address": f"127.0.0.1:{self.port}", "auth": "none", "tls": "none"}
                    ],
                    "clients": {"anonymous": {"may_send_as": ["*"]}},
                    "tenants": {
                        "crash": {
                            "provider": "capture",
                            "capture": {"path": str(self.capture)},
                            "domains": ["*"],
                            "sent_copy": "never",  # the delivery is what is counted
                        }
                    },
                }
            )
        )
        self.acked: set[int] = set()
        self.lock = threading.Lock()
        self.counter = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.base / "relayd.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relayd", "-c", str(self.config), "run"],
            stdout=log,
            stderr=log,
            cwd=REPO,
            start_new_session=True,
        )
        log.close()
        if not wait_port(self.port):
            raise RuntimeError("relayd did not start; see relayd.log")

    def kill(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until no process of the group is left
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)

    def next_number(self) -> int:
        with self.lock:
            self.counter += 1
            return self.counter

    def sender(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=5) as smtp:
                    while not stop.is_set():
                        n = self.next_number()
                        body = (
                            f"From: <{SENDER}>\r\nTo: <sink@crash.example>\r\n"
                            f"Subject: crash {n}\r\nX-Crash-Number: {n}\r\n\r\n"
                        ).encode() + b"x" * random.choice((200, 4000, 60_000))
                        refused = smtp.sendmail(SENDER, ["sink@crash.example"], body)
                        if not refused:  # the 250 came: the message is relayd's now
                            with self.lock:
                                self.acked.add(n)
                        time.sleep(self.pause)
            except (OSError, smtplib.SMTPException):
                time.sleep(0.01)  # the daemon is down: try again

    def delivered(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        number = re.compile(rb"X-Crash-Number: (\d+)")
        for path in (self.capture / "new").iterdir():
            found = number.search(path.read_bytes()[:4096])
            if found:
                n = int(found.group(1))
                counts[n] = counts.get(n, 0) + 1
        return counts

    def spool_empty(self) -> bool:
        spool = self.base / "state" / "spool"
        for queue in ("incoming", "active", "deferred", "hold", "copy"):
            directory = spool / queue
            if directory.is_dir():
                for path in directory.iterdir():
                    try:
                        if path.stat().st_mode & 0o400:  # a message, not a reserved file
                            return False
                    except FileNotFoundError:
                        continue
        return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--pause", type=float, default=0.02, help="seconds between messages")
    parser.add_argument("--max-uptime", type=float, default=1.5, help="seconds before a kill")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="relayd-crash-", dir="/var/tmp"))
    campaign = Campaign(base, args.senders, args.pause)
    stop = threading.Event()
    threads = [
        threading.Thread(target=campaign.sender, args=(stop,), daemon=True)
        for _ in range(args.senders)
    ]
    try:
        campaign.start()
        for t in threads:
            t.start()
        for cycle in range(args.cycles):
            time.sleep(random.uniform(0.05, args.max_uptime))
            campaign.kill()
            campaign.start()
            if (cycle + 1) % 20 == 0:
                print(f"{cycle + 1} kills, {len(campaign.acked)} acknowledged", flush=True)
        stop.set()
        for t in threads:
            t.join(10)
        deadline = time.monotonic() + 600
        while not campaign.spool_empty() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        delivered = campaign.delivered()
        lost = sorted(campaign.acked - set(delivered))
        twice = sum(1 for n in campaign.acked if delivered.get(n, 0) > 1)
        print(
            json.dumps(
                {
                    "kills": args.cycles,
                    "acknowledged": len(campaign.acked),
                    "delivered": len(delivered),
                    "lost": len(lost),
                    "delivered_twice": twice,
                    "spool_empty": campaign.spool_empty(),
                }
            )
        )
        if lost:
            print(f"LOST: {lost[:20]}", file=sys.stderr)
        return 1 if lost else 0
    finally:
        stop.set()
        if campaign.proc is not None and campaign.proc.poll() is None:
            campaign.kill()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
