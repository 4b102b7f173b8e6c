"""A private Postfix instance configured as a durable relay to one upstream (smtp-sink).

The baseline relayd is measured against: Postfix accepts on a loopback port, writes and
fsyncs its queue file before its 250, and relays everything to ``[127.0.0.1]:SINK``.
Needs root (the Postfix master does). Runs from its own config and queue directories, laid
out as for the test suite's Postfix (tests/mailworld/postfix_files.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from mailworld.postfix_files import (
    INTERNAL_SERVICES,
    MASTER,
    make_queue_dirs,
    write_config,
)

__all__ = ["PostfixRelay"]


class PostfixRelay:
    def __init__(self, base: Path, port: int, sink_port: int) -> None:
        self.base = base
        self.port = port
        self.sink_port = sink_port
        self.config_dir = base / "postfix-config"
        self.queue_dir = base / "postfix-queue"
        self.data_dir = base / "postfix-data"
        self.log_path = base / "postfix.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> None:
        main = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix-relay.bench",
            "mydestination": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "maillog_file": "/dev/stdout",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "relayhost": f"[127.0.0.1]:{self.sink_port}",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtp_tls_security_level": "none",
            "smtpd_peername_lookup": "no",
            "message_size_limit": str(60 * 1024 * 1024),
            # Loopback relays to one sink: let Postfix use as many connections as it likes.
            "default_destination_concurrency_limit": "20",
        }
        listener = f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
        write_config(self.config_dir, main, listener + INTERNAL_SERVICES)
        make_queue_dirs(self.queue_dir, self.data_dir)

    def start(self) -> None:
        self._write_config()
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [str(MASTER), "-c", str(self.config_dir), "-s"],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()

    @property
    def pgid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        # Children linger after the master exits: take the whole group down.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None
