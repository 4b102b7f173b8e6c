"""Several accepting processes, one scheduler (SPEC "Delivery"; issue 6).

relayd runs as a real process with the capture provider (no mail world needed): accepting
processes share the listening socket and the spool, the main process alone delivers. A
stopped (SIGSTOP) accepting process takes no connection, which makes "this one accepted it"
certain without asking the kernel.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import signal
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relayd.passwords import hash_password

from .relayd_proc import Relayd, free_port, proc_stats, spool_messages, write_config

pytestmark = pytest.mark.integration

SENDER = "app@acme.test"


def setup(tmp_path: Path, *, auth: str = "none", **extra: Any) -> tuple[Relayd, Path]:
    port = free_port()
    capture = tmp_path / "capture"
    config = {
        "state_directory": str(tmp_path / "state"),
        "log_level": "debug",
        "listen": [{"address": f"127.0.0.1:{port}", "auth": auth, "tls": "none"}],
        "clients": {"anonymous": {"may_send_as": [SENDER]}},
        "spool": {"retry": {"first": "1s", "max": "2s", "give_up_after": "1h"}},
        "tenants": {
            "acme": {"provider": "capture", "capture": {"path": str(capture)}, "domains": ["*"]}
        },
        **extra,
    }
    path = write_config(tmp_path / "relayd.yaml", config)
    return Relayd(path, port, tmp_path / "relayd.log"), capture


def children(pid: int) -> list[int]:
    return sorted(p for p, fields in proc_stats() if int(fields[1]) == pid and fields[0] != "Z")


def message(subject: str) -> bytes:
    return (
        f"From: <{SENDER}>\r\nTo: <rcpt@example.org>\r\nSubject: {subject}\r\n\r\n"
        f"body of {subject}\r\n.starts with a dot\r\n"
    ).encode()


def send(port: int, subject: str) -> str:
    """One message on a connection of its own; smtplib raises unless it got its 250."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.sendmail(SENDER, ["rcpt@example.org"], message(subject))
    return subject


def subjects_in(capture: Path) -> list[str]:
    new = capture / "new"
    return sorted(
        line.split(b": ", 1)[1].decode()
        for p in (new.iterdir() if new.exists() else [])
        for line in p.read_bytes().split(b"\r\n")
        if line.startswith(b"Subject: ")
    )


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """The accepting process stopped (SIGSTOP) for the block: the other one takes the
    connections made meanwhile."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def delivered_subjects(capture: Path, count: int, timeout: float = 30.0) -> list[str]:
    """The subjects delivered once ``count`` have arrived (and a moment more: a message
    delivered twice would show up)."""
    deadline = time.monotonic() + timeout
    while len(subjects_in(capture)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    return subjects_in(capture)


def test_both_accepting_processes_accept_and_one_scheduler_delivers_each_once(
    tmp_path: Path,
) -> None:
    relayd, capture = setup(tmp_path, accept_processes=2)
    relayd.start()
    try:
        assert relayd.proc is not None
        first, second = children(relayd.proc.pid)
        sent = []
        for stopped, name in ((first, "b"), (second, "a")):
            with paused(stopped):  # the other one must take these connections
                sent += [send(relayd.port, f"{name}{i}") for i in range(5)]
        assert delivered_subjects(capture, 10) == sorted(sent)
        log = relayd.log()
        assert log.count("status=delivered") == 10
        assert children(relayd.proc.pid) == [first, second]
    finally:
        assert relayd.stop() == 0


def test_an_accepting_process_killed_mid_data_loses_nothing_that_got_250(
    tmp_path: Path,
) -> None:
    relayd, capture = setup(tmp_path, accept_processes=2)
    relayd.start()
    try:
        assert relayd.proc is not None
        victim, other = children(relayd.proc.pid)
        with paused(other), smtplib.SMTP("127.0.0.1", relayd.port, timeout=30) as kept:
            acknowledged = []
            for i in range(3):
                kept.sendmail(SENDER, ["rcpt@example.org"], message(f"acked{i}"))
                acknowledged.append(f"acked{i}")
            with socket.create_connection(("127.0.0.1", relayd.port), timeout=30) as raw:
                raw.sendall(
                    f"EHLO t\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<rcpt@example.org>\r\n"
                    "DATA\r\n".encode()
                )
                time.sleep(0.3)
                raw.sendall(message("half").split(b"\r\n\r\n")[0] + b"\r\n\r\npart of")
                time.sleep(0.3)
                os.kill(victim, signal.SIGKILL)
                heard = b""
                with contextlib.suppress(ConnectionResetError):
                    while chunk := raw.recv(4096):
                        heard += chunk
                assert b"354" in heard and b"queued as" not in heard
        assert delivered_subjects(capture, 3) == acknowledged
        relayd.wait_for_log("killed by signal 9; starting another")
        deadline = time.monotonic() + 20
        while len(children(relayd.proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        replacement = [p for p in children(relayd.proc.pid) if p != other]
        assert len(replacement) == 1 and replacement[0] != victim
        with paused(other):  # the replacement serves
            send(relayd.port, "after")
        assert delivered_subjects(capture, 4) == sorted([*acknowledged, "after"])
    finally:
        assert relayd.stop() == 0


def test_sigkill_of_the_main_process_leaves_no_process_accepting(tmp_path: Path) -> None:
    relayd, _ = setup(tmp_path, accept_processes=2)
    relayd.start()
    assert relayd.proc is not None
    workers = children(relayd.proc.pid)
    assert len(workers) == 2
    os.kill(relayd.proc.pid, signal.SIGKILL)
    relayd.proc.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        alive = [p for p in workers if Path(f"/proc/{p}").exists() and not _zombie(p)]
        if not alive:
            break
        time.sleep(0.05)
    assert not alive
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", relayd.port), timeout=2).close()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def test_reload_reaches_every_accepting_process_and_a_broken_file_none(tmp_path: Path) -> None:
    relayd, capture = setup(tmp_path, accept_processes=2)
    relayd.start()
    try:
        assert relayd.proc is not None
        workers = children(relayd.proc.pid)
        text = relayd.config_path.read_text()
        relayd.config_path.write_text(text.replace(SENDER, "other@acme.test"))
        os.kill(relayd.proc.pid, signal.SIGHUP)
        relayd.wait_for_log("configuration reloaded")
        time.sleep(0.5)  # the accepting processes reload on the main process's signal
        for stopped in workers:
            with (
                paused(stopped),  # the other one answers
                smtplib.SMTP("127.0.0.1", relayd.port, timeout=30) as smtp,
            ):
                smtp.ehlo("t")
                code, _ = smtp.mail(SENDER)
                assert code == 550  # the old sender is no longer allowed here
                smtp.rset()
                code, _ = smtp.mail("other@acme.test")
                assert code == 250

        relayd.config_path.write_text(text + "tenants: [this is: broken\n")
        os.kill(relayd.proc.pid, signal.SIGHUP)
        relayd.wait_for_log("reload refused, old config still serving")
        time.sleep(0.5)
        for stopped in workers:
            with (
                paused(stopped),
                smtplib.SMTP("127.0.0.1", relayd.port, timeout=30) as smtp,
            ):
                smtp.ehlo("t")
                assert smtp.mail("other@acme.test")[0] == 250  # still the reloaded one
        assert children(relayd.proc.pid) == workers
        assert subjects_in(capture) == []
    finally:
        assert relayd.stop() == 0


def test_sigterm_lets_a_message_in_data_finish(tmp_path: Path) -> None:
    relayd, capture = setup(tmp_path, accept_processes=2)
    relayd.start()
    assert relayd.proc is not None
    with socket.create_connection(("127.0.0.1", relayd.port), timeout=30) as raw:
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(
            f"EHLO t\r\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<rcpt@example.org>\r\nDATA\r\n".encode()
        )
        while not reader.readline().startswith(b"354"):
            pass
        raw.sendall(b"Subject: draining\r\n\r\nfirst half\r\n")
        relayd.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        raw.sendall(b"second half\r\n.\r\n")
        assert reader.readline().startswith(b"250 2.0.0 queued as")
    assert relayd.proc.wait(40) == 0
    spooled = [
        p for q in ("incoming", "deferred") for p in spool_messages(tmp_path / "state/spool" / q)
    ]
    delivered = list((capture / "new").iterdir()) if (capture / "new").exists() else []
    assert len(spooled) + len(delivered) == 1


def test_the_main_process_accepts_itself_with_accept_processes_0(tmp_path: Path) -> None:
    relayd, capture = setup(tmp_path, accept_processes=0)
    relayd.start()
    try:
        assert relayd.proc is not None
        assert children(relayd.proc.pid) == []
        send(relayd.port, "in-process")
        assert delivered_subjects(capture, 1) == ["in-process"]
    finally:
        assert relayd.stop() == 0


def _serving_pid(pids: list[int], server_port: int, client_port: int) -> int | None:
    """Which of ``pids`` holds the server end of the connection from ``client_port``."""
    wanted = f":{server_port:04X}", f":{client_port:04X}"
    inode = None
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(wanted[0]) and fields[2].endswith(wanted[1]):
                inode = fields[9]
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
    return None


def test_failed_logins_are_counted_by_every_accepting_process(tmp_path: Path) -> None:
    password = "right-" + secrets.token_hex(6)
    relayd, _ = setup(
        tmp_path,
        auth="optional",
        accept_processes=3,
        clients={"crm": {"password_hash": hash_password(password), "may_send_as": [SENDER]}},
    )
    relayd.start()
    assert relayd.proc is not None
    accepting = children(relayd.proc.pid)
    wrong = base64.b64encode(b"\0crm\0wrong-password").decode()
    replies: list[str] = []
    served_by: set[int | None] = set()
    for _ in range(15):
        with smtplib.SMTP("127.0.0.1", relayd.port, timeout=10) as smtp:
            assert smtp.sock is not None
            served_by.add(_serving_pid(accepting, relayd.port, smtp.sock.getsockname()[1]))
            smtp.ehlo("client.test")
            code, text = smtp.docmd("AUTH", f"PLAIN {wrong}")
            replies.append(f"{code} {text.decode()}")
    print(f"15 wrong passwords, served by processes {sorted(map(str, served_by))}")
    assert len(served_by - {None}) >= 2  # spread over the accepting processes
    assert all(r.startswith("535") for r in replies[:5]), replies
    assert all(r.startswith("421 4.7.0") for r in replies[5:]), replies  # the 6th and on
    assert relayd.stop() == 0
