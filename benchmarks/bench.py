"""relayd side by side with Postfix as a local durable relay, on loopback, in one run.

    python3 benchmarks/bench.py [--messages 4000] [--quick]

smtp-sink (from the postfix package) is the upstream; smtp-source drives 20 SMTP sessions
through (a) relayd and (b) a private Postfix configured as a durable relay to the same sink.
For each: end-to-end msg/s until the sink has every message, accept latency p50/p99 for one
sequential client, peak memory (PSS summed over the relay's processes, so shared pages count
once; and summed RSS, which counts them in every process), CPU seconds per 1,000 messages —
and the relayd/Postfix ratios. Then relayd alone: memory while one 25 MiB message passes,
start-to-READY with 100,000 spooled messages, and upstream logins per 1,000 messages to one
account.

Needs root (the Postfix master) and the Debian postfix package. Not a test: nothing here is
asserted; numbers drift ±20 % on shared machines, so compare ratios from the same run.
"""

from __future__ import annotations

import abc
import argparse
import contextlib
import json
import os
import pty
import secrets
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from postfix_relay import PostfixRelay

REPO = Path(__file__).resolve().parents[1]
SENDER = "bench@relayd.bench"
RCPT = "sink@elsewhere.bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


# -- process accounting -----------------------------------------------------------------


def group_pids(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of one process: PSS shares each shared page among the processes mapping
    it, so summed over a group it counts a page once; summed RSS counts it in each."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass
class Sampler:
    """Samples a process group: peak summed PSS and RSS, and the CPU time of every process
    seen."""

    pgid: int
    peak_pss_kib: int = 0
    peak_rss_kib: int = 0
    cpu: dict[int, float] = field(default_factory=dict)

    def sample(self) -> None:
        pids = group_pids(self.pgid)
        memory = [memory_kib(p) for p in pids]
        self.peak_pss_kib = max(self.peak_pss_kib, sum(pss for pss, _ in memory))
        self.peak_rss_kib = max(self.peak_rss_kib, sum(rss for _, rss in memory))
        for pid in pids:
            self.cpu[pid] = max(self.cpu.get(pid, 0.0), cpu_seconds(pid))

    def cpu_total(self) -> float:
        return sum(self.cpu.values())


# -- the relays -------------------------------------------------------------------------


class Relay(abc.ABC):
    name = ""
    port = 0

    @abc.abstractmethod
    def start(self, sink_port: int) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...

    @abc.abstractmethod
    def pgid(self) -> int: ...


class RelaydRelay(Relay):
    name = "relayd"

    def __init__(self, base: Path, log_level: str = "info") -> None:
        self.base = base
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, sink_port: int, state: Path) -> Path:
        secret = self.base / "upstream-password"
        # Long and random: the log redactor would otherwise mask every "bench" in the log.
        secret.write_text(secrets.token_urlsafe(16) + "\n")
        os.chmod(secret, 0o600)
        config = {
            "state_directory": str(state),
            "log_level": self.log_level,
            "listen": [{"address": f"127.0.0.1:{self.port}", "auth": "none", "tls": "none"}],
            "clients": {"anonymous": {"may_send_as": [SENDER]}},
            "tenants": {
                "bench": {
                    "provider": "custom",
                    "smtp": {"host": "127.0.0.1", "port": sink_port, "tls": "none"},
                    "accounts": [{"address": SENDER, "password": {"file": str(secret)}}],
                }
            },
        }
        path = self.base / "relayd.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        return path

    def start(self, sink_port: int, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        state = self.base / "state"
        shutil.rmtree(state, ignore_errors=True)
        config = self.write_config(sink_port, state)
        log = open(self.base / "relayd.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relayd", "-c", str(config), "run"],
            stdout=log,
            stderr=log,
            cwd=REPO,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        log.close()
        wait_port(self.port)

    def pgid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc = None


class PostfixBench(Relay):
    name = "postfix"

    def __init__(self, base: Path) -> None:
        self.base = base
        self.postfix: PostfixRelay | None = None

    def start(self, sink_port: int) -> None:
        self.port = free_port()
        base = self.base / f"postfix-{self.port}"
        base.mkdir(parents=True)
        os.chmod(base, 0o755)
        self.postfix = PostfixRelay(base, self.port, sink_port)
        self.postfix.start()
        wait_port(self.port)

    def pgid(self) -> int:
        assert self.postfix is not None
        return self.postfix.pgid

    def stop(self) -> None:
        if self.postfix is not None:
            self.postfix.stop()
        self.postfix = None


# -- measurements -----------------------------------------------------------------------


class Sink:
    """smtp-sink with its running counters (-c) read live: the end-to-end clock."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages = 0
        # smtp-sink block-buffers its counters into a pipe; a pseudo-terminal gets them live.
        # -a: no AUTH offered. smtp-sink answers AUTH with 250 rather than RFC 4954's 235,
        # which relayd rightly treats as a failed login; without AUTH on a loopback `tls: none`
        # upstream, relayd sends as to a local MTA hop.
        self._pty, child = pty.openpty()
        self.proc = subprocess.Popen(
            ["smtp-sink", "-a", "-c", "-u", "nobody", f"127.0.0.1:{port}", "1024"],
            stdout=child,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(child)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_port(port)

    def _read(self) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(self._pty, 65536)
            except OSError:  # the pty is gone once smtp-sink exits
                return
            if not chunk:
                return
            pending += chunk
            *records, pending = pending.split(b"\r")
            for record in records:
                for item in record.split():
                    if item.startswith(b"mesg="):
                        self.messages = int(item[5:])

    def wait_for(self, count: int, timeout: float, tick: Callable[[], None]) -> bool:
        deadline = time.monotonic() + timeout
        while self.messages < count and time.monotonic() < deadline:
            tick()
            time.sleep(0.05)
        return self.messages >= count

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        with contextlib.suppress(OSError):
            os.close(self._pty)


# Process groups this run has started (relays and sinks): ``settle`` waits for them to end.
STARTED_GROUPS: list[int] = []


def settle() -> None:
    """Start each measurement from a quiet machine: the previous one's processes gone and
    its dirty pages written back, so neither relay pays for the other's leftovers (the
    one measured first would otherwise share the disk with the last one's clean-up)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(group_pids(g) for g in STARTED_GROUPS):
        time.sleep(0.05)
    os.sync()
    time.sleep(1.0)


def start_with_sink(relay: Relay) -> Sink:
    """A new smtp-sink, and the relay started in front of it; ``settle`` will wait for both."""
    sink = Sink(free_port())
    relay.start(sink.port)
    STARTED_GROUPS.extend((sink.proc.pid, relay.pgid()))
    return sink


def smtp_source(port: int, messages: int, size: int, *, keep: bool = False) -> list[str]:
    """20 concurrent sessions; ``keep``: several messages per connection (-d)."""
    argv = ["smtp-source", "-s", "20", "-m", str(messages), "-l", str(size)]
    argv += ["-f", SENDER, "-t", RCPT, "-M", "bench.client"]
    if keep:
        argv.append("-d")
    return [*argv, f"127.0.0.1:{port}"]


def throughput(relay: Relay, messages: int, size: int, keep: bool) -> dict[str, float]:
    settle()
    sink = start_with_sink(relay)
    sampler = Sampler(relay.pgid())
    sampler.sample()
    cpu_before = sampler.cpu_total()
    started = time.monotonic()
    source = subprocess.Popen(
        smtp_source(relay.port, messages, size, keep=keep),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    complete = sink.wait_for(messages, 600, sampler.sample)
    elapsed = time.monotonic() - started
    source.wait(60)
    sampler.sample()
    sink.stop()
    relay.stop()
    return {
        "msg_per_s": messages / elapsed if complete else 0.0,
        "peak_pss_mib": sampler.peak_pss_kib / 1024,
        "peak_rss_mib": sampler.peak_rss_kib / 1024,
        "cpu_s_per_1000": (sampler.cpu_total() - cpu_before) * 1000 / messages,
    }


def accept_latency(relay: Relay, messages: int) -> dict[str, float]:
    settle()
    sink = start_with_sink(relay)
    body = (f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: latency\r\n\r\n").encode()
    body += b"x" * 76 + b"\r\n"
    body = body + (b"y" * 78 + b"\r\n") * (4096 // 80)
    times = []
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=30) as smtp:
        smtp.ehlo("bench.client")
        for _ in range(messages):
            smtp.mail(SENDER)
            smtp.rcpt(RCPT)
            t0 = time.perf_counter()
            code, _ = smtp.data(body)  # DATA, the message, "." and the reply: 250 = durable
            times.append(time.perf_counter() - t0)
            assert code == 250
    relay.stop()
    sink.stop()
    times.sort()
    return {
        "p50_ms": statistics.median(times) * 1000,
        "p99_ms": times[int(len(times) * 0.99) - 1] * 1000,
    }


def big_message_memory(base: Path) -> dict[str, float]:
    relay = RelaydRelay(base / "big")
    (base / "big").mkdir()
    sink = start_with_sink(relay)
    sampler = Sampler(relay.pgid())
    time.sleep(0.5)
    sampler.sample()
    idle = sampler.peak_pss_kib
    payload = (f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: big\r\n\r\n").encode()
    payload += (b"z" * 998 + b"\r\n") * (25 * 1024 * 1024 // 1000)

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=120) as smtp:
            smtp.sendmail(SENDER, [RCPT], payload)

    sender = threading.Thread(target=send)
    sender.start()
    sink.wait_for(1, 300, sampler.sample)
    sender.join()
    sampler.sample()
    sink.stop()
    relay.stop()
    return {
        "idle_pss_mib": idle / 1024,
        "peak_pss_mib": sampler.peak_pss_kib / 1024,
        "rise_over_size": (sampler.peak_pss_kib - idle) / 1024 / 25,
    }


def ready_with_spool(base: Path, count: int) -> dict[str, float]:
    """Time from exec to READY=1 with `count` messages waiting in the spool."""
    from relayd.core.envelope import Envelope
    from relayd.core.queues import Queue
    from relayd.spool.fileformat import encode_plain
    from relayd.spool.store import Spool, new_queue_id

    relay = RelaydRelay(base / "ready")
    (base / "ready").mkdir()
    state = relay.base / "state"
    spool = Spool(state, fsync=False)
    spool.prepare()
    body = b"From: <" + SENDER.encode() + b">\r\nSubject: queued\r\n\r\n" + b"q" * 900 + b"\r\n"
    for _ in range(count):
        qid = new_queue_id()
        env = Envelope(qid, time.time(), "anonymous", "bench", SENDER, (RCPT,), SENDER, "bench")
        (spool.directory(Queue.INCOMING) / qid).write_bytes(encode_plain(env, body))
    notify_path = relay.base / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(120)
    relay.port = free_port()
    config = relay.write_config(free_port(), state)  # upstream port with nothing listening
    log = open(relay.base / "relayd.log", "ab")  # noqa: SIM115
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "relayd", "-c", str(config), "run"],
        stdout=log,
        stderr=log,
        cwd=REPO,
        start_new_session=True,
        env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
    )
    log.close()
    ready = None
    while ready is None:
        data = sock.recv(4096).decode()
        if "READY=1" in data:
            ready = time.monotonic() - started
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    sock.close()
    return {"seconds_to_ready": ready, "messages": float(count)}


def logins_per_1000(base: Path) -> dict[str, float]:
    relay = RelaydRelay(base / "logins", log_level="debug")
    (base / "logins").mkdir()
    sink = start_with_sink(relay)
    subprocess.run(
        smtp_source(relay.port, 1000, 4096),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    sink.wait_for(1000, 300, lambda: None)
    sink.stop()
    relay.stop()
    logins = (relay.base / "relayd.log").read_text().count("logged in to")
    return {"logins": float(logins)}


def run(messages: int, latency_messages: int, spool_messages: int) -> dict[str, object]:
    base = Path(tempfile.mkdtemp(prefix="relayd-bench-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    results: dict[str, object] = {"machine": machine()}
    try:
        for label, size, keep in (
            ("4KB new-conn", 4096, False),
            ("4KB kept-conn", 4096, True),
            ("100KB new-conn", 102400, False),
            ("100KB kept-conn", 102400, True),
        ):
            n = messages if size == 4096 else max(200, messages // 8)
            row = {}
            for relay in (RelaydRelay(base / f"r-{label}".replace(" ", "_")), PostfixBench(base)):
                if isinstance(relay, RelaydRelay):
                    relay.base.mkdir()
                row[relay.name] = throughput(relay, n, size, keep)
            results[f"throughput {label} ({n} msgs)"] = row
            print(label, json.dumps(row), flush=True)
        lat = {}
        relayd_lat = RelaydRelay(base / "latency")
        relayd_lat.base.mkdir()
        for relay in (relayd_lat, PostfixBench(base)):
            lat[relay.name] = accept_latency(relay, latency_messages)
        results["accept latency, one sequential client, 4 KB"] = lat
        print("latency", json.dumps(lat), flush=True)
        results["one 25 MiB message"] = big_message_memory(base)
        print("25MiB", json.dumps(results["one 25 MiB message"]), flush=True)
        results["start to READY"] = ready_with_spool(base, spool_messages)
        print("ready", json.dumps(results["start to READY"]), flush=True)
        results["upstream logins per 1000 messages"] = logins_per_1000(base)
        print("logins", json.dumps(results["upstream logins per 1000 messages"]), flush=True)
    finally:
        subprocess.run(["pkill", "-f", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)
    return results


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{os.cpu_count()} cpu ({cpu}), {os.uname().release}"


def report(results: dict[str, object]) -> str:
    lines = [f"machine: {results['machine']}", ""]
    ratio: Callable[[float, float], str] = lambda a, b: f"{a / b:.2f}x" if b else "n/a"  # noqa: E731
    lines.append(f"{'measure':48} {'relayd':>10} {'postfix':>10} {'ratio':>8}")
    for key, value in results.items():
        if not key.startswith("throughput") or not isinstance(value, dict):
            continue
        r, p = value["relayd"], value["postfix"]
        lines.append(
            f"{key + ' msg/s':48} {r['msg_per_s']:10.0f} {p['msg_per_s']:10.0f} "
            f"{ratio(r['msg_per_s'], p['msg_per_s']):>8}"
        )
        lines.append(
            f"{'  peak PSS MiB':48} {r['peak_pss_mib']:10.1f} {p['peak_pss_mib']:10.1f} "
            f"{ratio(r['peak_pss_mib'], p['peak_pss_mib']):>8}"
        )
        lines.append(
            f"{'  peak RSS MiB (summed)':48} {r['peak_rss_mib']:10.1f} "
            f"{p['peak_rss_mib']:10.1f} {ratio(r['peak_rss_mib'], p['peak_rss_mib']):>8}"
        )
        lines.append(
            f"{'  CPU s / 1000 msgs':48} {r['cpu_s_per_1000']:10.2f} "
            f"{p['cpu_s_per_1000']:10.2f} "
            f"{ratio(r['cpu_s_per_1000'], p['cpu_s_per_1000']):>8}"
        )
    lat = results.get("accept latency, one sequential client, 4 KB")
    if isinstance(lat, dict):
        for q in ("p50_ms", "p99_ms"):
            r, p = lat["relayd"][q], lat["postfix"][q]
            lines.append(f"{'accept latency ' + q:48} {r:10.2f} {p:10.2f} {ratio(r, p):>8}")
    for key in ("one 25 MiB message", "start to READY", "upstream logins per 1000 messages"):
        lines.append(f"{key}: {json.dumps(results.get(key))}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--latency-messages", type=int, default=2000)
    parser.add_argument("--spool-messages", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("benchmarks/bench.py needs root (the Postfix master runs as root)", file=sys.stderr)
        return 2
    if args.quick:
        args.messages, args.latency_messages, args.spool_messages = 400, 100, 2000
    results = run(args.messages, args.latency_messages, args.spool_messages)
    print()
    print(json.dumps(results, indent=2) if args.json else report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
