"""Three relayd hosts sending as one mailbox, with fleet mode and without, in one run.

    python3 benchmarks/fleet.py [--messages 1500] [--quick]

One smtp-sink is the mailbox's upstream; three relayd instances on this machine (their own
state, spool and listener, as three application hosts would have) each get ``--messages``
4 KB messages from an smtp-source of their own, all at once; the clock runs until the sink
has every message. Modes, each from a fresh state:

- ``local``: no fleet; each host keeps the mailbox's limits by itself (3 connections each,
  9 in all — which is exactly what a mailbox limited to 3 would refuse);
- ``fleet, 9 connections``: fleet mode with ``max_connections: 9`` and a per-minute limit
  too high to bind: the same 9 sessions as ``local``, now leased through PostgreSQL and
  each start counted in the shared window — the cost of the shared accounting itself;
- ``fleet, 3 connections``: fleet mode with the provider's real limit, 3 for the fleet.

PostgreSQL is started here (``initdb`` in a temporary directory, as the suite does). Needs
root (it runs the server as the postgres user) and Debian's postfix (smtp-sink/-source) and
postgresql packages. Not a test: nothing is asserted; compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench import REPO, SENDER, Sink, free_port, machine, smtp_source, wait_port
from mailworld.postgres import PostgresServer

HOSTS = ("host-a", "host-b", "host-c")
# A per-minute limit that never binds here, so that every start is counted in the window.
BIG = 10**6


def host_config(
    base: Path,
    name: str,
    port: int,
    sink_port: int,
    limits: dict[str, int],
    fleet: dict[str, Any] | None,
    key: Path,
) -> Path:
    secret = base / "upstream-password"
    if not secret.exists():
        secret.write_text(secrets.token_urlsafe(16) + "\n")
        os.chmod(secret, 0o600)
    config: dict[str, Any] = {
        "state_directory": str(base / name / "state"),
        "log_level": "info",
        "helo_name": f"{name}.bench",
        "listen": [{"address": f"127.0.0.1:{port}", "auth": "none", "tls": "none"}],
        "clients": {"anonymous": {"may_send_as": [SENDER]}},
        "tokens": {"key": {"file": str(key)}},
        "tenants": {
            "bench": {
                "provider": "custom",
                "smtp": {"host": "127.0.0.1", "port": sink_port, "tls": "none"},
                "limits": limits,
                "accounts": [{"address": SENDER, "password": {"file": str(secret)}}],
            }
        },
    }
    if fleet is not None:
        config["fleet"] = {**fleet, "name": name}
    path = base / name / "relayd.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def run_mode(
    base: Path,
    label: str,
    messages: int,
    limits: dict[str, int],
    fleet: dict[str, Any] | None,
    key: Path,
) -> dict[str, float]:
    root = base / label.replace(" ", "_").replace(",", "")
    root.mkdir()
    sink = Sink(free_port())
    procs: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    try:
        for name in HOSTS:
            port = free_port()
            path = host_config(root, name, port, sink.port, limits, fleet, key)
            if fleet is not None and not ports:
                subprocess.run(
                    [sys.executable, "-m", "relayd", "-c", str(path), "fleet", "init"],
                    cwd=REPO,
                    check=True,
                    capture_output=True,
                )
            log = open(root / name / "relayd.log", "ab")  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "relayd", "-c", str(path), "run"],
                    stdout=log,
                    stderr=log,
                    cwd=REPO,
                    start_new_session=True,
                )
            )
            log.close()
            ports.append(port)
        for port in ports:
            wait_port(port)
        time.sleep(6.0)  # past the fleet's settling time after start, for every mode alike
        started = time.monotonic()
        sources = [
            subprocess.Popen(
                smtp_source(port, messages, 4096, keep=True),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for port in ports
        ]
        complete = sink.wait_for(messages * len(HOSTS), 900, lambda: None)
        elapsed = time.monotonic() - started
        for source in sources:
            source.wait(60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 15)
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
        sink.stop()
    total = messages * len(HOSTS)
    return {"msg_per_s": total / elapsed if complete else 0.0, "seconds": elapsed}


def run(messages: int) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="relayd-fleet-bench-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    key = base / "token-key"
    key.write_text(secrets.token_urlsafe(32) + "\n")
    os.chmod(key, 0o600)
    postgres = PostgresServer()
    results: dict[str, Any] = {"machine": machine(), "messages": messages * len(HOSTS)}
    try:
        postgres.init()
        modes: list[tuple[str, dict[str, int], bool]] = [
            ("local", {"max_connections": 3}, False),
            (
                "fleet, 9 connections",
                {"max_connections": 9, "max_messages_per_minute": 10**6},
                True,
            ),
            ("fleet, 3 connections", {"max_connections": 3}, True),
        ]
        for label, limits, fleet_mode in modes:
            fleet: dict[str, Any] | None = None
            if fleet_mode:
                dsn = base / f"dsn-{len(results)}"
                dsn.write_text(postgres.new_database() + "\n")
                os.chmod(dsn, 0o600)
                fleet = {"database": {"file": str(dsn)}}
            results[label] = run_mode(base, label, messages, limits, fleet, key)
            print(label, json.dumps(results[label]), flush=True)
    finally:
        postgres.destroy()
        shutil.rmtree(base, ignore_errors=True)
    return results


def report(results: dict[str, Any]) -> str:
    local = results["local"]["msg_per_s"]
    lines = [f"machine: {results['machine']}", f"messages: {results['messages']} (4 KB)", ""]
    for label in ("local", "fleet, 9 connections", "fleet, 3 connections"):
        rate = results[label]["msg_per_s"]
        ratio = f"{rate / local:.2f}x" if local else "n/a"
        lines.append(f"{label:24} {rate:8.0f} msg/s  {ratio:>6} of local")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1500, help="per host")
    parser.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("benchmarks/fleet.py needs root (PostgreSQL runs as postgres)", file=sys.stderr)
        return 2
    results = run(200 if args.quick else args.messages)
    print()
    print(json.dumps(results, indent=2) if args.json else report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
