"""A private Postfix instance configured as a durable relay to one upstream (smtp-sink).

The baseline relayd is measured against: Postfix accepts on a loopback port, writes and
fsyncs its queue file before its 250, and relays everything to ``[127.0.0.1]:SINK``.
Needs root (the Postfix master does). Runs from its own config and queue directories.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import signal
import subprocess
import time
from pathlib import Path

__all__ = ["PostfixRelay"]

MASTER = Path("/usr/lib/postfix/sbin/master")

_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup     unix  n - n 60    1 pickup
cleanup    unix  n - n -     0 cleanup
qmgr       unix  n - n 300   1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n -     - trivial-rewrite
bounce     unix  - - n -     0 bounce
defer      unix  - - n -     0 bounce
trace      unix  - - n -     0 bounce
verify     unix  - - n -     1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -     - proxymap
proxywrite unix  - - n -     1 proxymap
smtp       unix  - - n -     - smtp
relay      unix  - - n -     - smtp
showq      unix  n - n -     - showq
error      unix  - - n -     - error
retry      unix  - - n -     - error
discard    unix  - - n -     - discard
anvil      unix  - - n -     1 anvil
scache     unix  - - n -     1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


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
        self.config_dir.mkdir(parents=True, exist_ok=True)
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
        main_cf = self.config_dir / "main.cf"
        master_cf = self.config_dir / "master.cf"
        main_cf.write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
        master_cf.write_text(_MASTER_CF.format(port=self.port))
        old = time.time() - 10  # Postfix waits ~1.8 s at start when main.cf is brand new
        for path in (main_cf, master_cf):
            os.utime(path, (old, old))
        postfix_uid = pwd.getpwnam("postfix").pw_uid
        postdrop_gid = grp.getgrnam("postdrop").gr_gid
        self.queue_dir.mkdir(mode=0o755, exist_ok=True)
        (self.queue_dir / "pid").mkdir(mode=0o755, exist_ok=True)
        for sub in (
            "active",
            "bounce",
            "corrupt",
            "defer",
            "deferred",
            "flush",
            "hold",
            "incoming",
            "private",
            "saved",
            "trace",
        ):
            path = self.queue_dir / sub
            path.mkdir(mode=0o700, exist_ok=True)
            os.chown(path, postfix_uid, -1)
        for sub, mode in (("maildrop", 0o730), ("public", 0o710)):
            path = self.queue_dir / sub
            path.mkdir(exist_ok=True)
            os.chown(path, postfix_uid, postdrop_gid)
            os.chmod(path, mode)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(self.data_dir, postfix_uid, -1)

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
