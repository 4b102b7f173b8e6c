"""The files of a private Postfix instance: main.cf, master.cf and the queue layout.

Used by the test mail world (Postfix as the upstream submission server) and by the benchmark
(Postfix as a durable relay beside relayd). Nothing here starts a process.
"""

from __future__ import annotations

import grp
import os
import pwd
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["INTERNAL_SERVICES", "MASTER", "make_queue_dirs", "write_config"]

MASTER = Path("/usr/lib/postfix/sbin/master")

# master.cf lines of Postfix's own services, every one unchrooted (chroot column "n"): the
# instance's files live outside /var/spool/postfix.
INTERNAL_SERVICES = """\
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
lmtp       unix  - - n -     - lmtp
anvil      unix  - - n -     1 anvil
scache     unix  - - n -     1 scache
postlog    unix-dgram n - n - 1 postlogd
"""


def write_config(config_dir: Path, main: Mapping[str, str], master_cf: str) -> None:
    config_dir.mkdir(parents=True, exist_ok=True)
    main_cf = config_dir / "main.cf"
    master = config_dir / "master.cf"
    main_cf.write_text("".join(f"{k} = {v}\n" for k, v in main.items()))
    master.write_text(master_cf)
    # Postfix sleeps ~1.8 s at start-up if main.cf is younger than a second.
    old = time.time() - 10
    for path in (main_cf, master):
        os.utime(path, (old, old))


def make_queue_dirs(queue_dir: Path, data_dir: Path) -> None:
    """The queue layout `postfix check` would create (without its ~100 forks)."""
    postfix_uid = pwd.getpwnam("postfix").pw_uid
    postdrop_gid = grp.getgrnam("postdrop").gr_gid

    def mkdir(path: Path, uid: int, gid: int, mode: int) -> None:
        path.mkdir(exist_ok=True)
        os.chown(path, uid, gid)
        os.chmod(path, mode)

    mkdir(queue_dir, 0, 0, 0o755)
    mkdir(queue_dir / "pid", 0, 0, 0o755)
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
        mkdir(queue_dir / sub, postfix_uid, -1, 0o700)
    mkdir(queue_dir / "maildrop", postfix_uid, postdrop_gid, 0o730)
    mkdir(queue_dir / "public", postfix_uid, postdrop_gid, 0o710)
    mkdir(data_dir, postfix_uid, -1, 0o700)
