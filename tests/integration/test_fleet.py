"""Fleet mode (SPEC "Fleet"): three relayd hosts on one machine, one PostgreSQL database.

Each host has its own state directory, spool and listener; all share the tenant map, the
token key and the fleet database, as application hosts of one operator would. What the
mailbox's provider sees is measured where it sees it: the session-counting upstream
(``mailworld.throttling``) or Postfix and the token server.
"""

from __future__ import annotations

import os
import re
import secrets
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mailworld.oauth_server import OAuthServer
from mailworld.postgres import PostgresServer
from mailworld.throttling import SessionLimitedUpstream
from mailworld.world import MailWorld

from relayd.config import load_config
from relayd.fleet.schema import LATEST
from relayd.fleet.tokens import publish_consent
from relayd.oauth.store import StoredTokens, TokenStore, new_consent_id
from relayd.passwords import hash_password

from .conftest import Mailbox, NewMailbox
from .ops_cli import wait_until
from .relayd_proc import REPO, Relayd, free_port, write_config, write_secret
from .test_oauth import MS_CLIENT, microsoft_tenant, oauth
from .test_relay_delivery import message, spooled

pytestmark = pytest.mark.integration

__all__ = ["oauth"]  # the fixture, used by the token test

NAMES = ("host-a", "host-b", "host-c")


@dataclass
class Host:
    name: str
    dir: Path
    port: int
    config_path: Path
    relayd: Relayd
    client_password: str

    def relayd_cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "relayd", "-c", str(self.config_path), *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=timeout,
        )

    def submit(self, sender: str, rcpt: str, subjects: list[str]) -> None:
        """One session, many messages; each got its 250 (durable on this host)."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as smtp:
            smtp.login("app", self.client_password)
            for subject in subjects:
                smtp.sendmail(sender, [rcpt], message(sender, rcpt, subject))

    @property
    def state(self) -> Path:
        return self.dir / "state"


class Fleet:
    def __init__(self, base: Path, database_url: str) -> None:
        self.base = base
        self.secrets = base / "secrets"
        self.dsn = write_secret(self.secrets / "fleet-dsn", database_url)
        self.token_key = write_secret(self.secrets / "token-key", secrets.token_urlsafe(32))
        self.hosts: list[Host] = []

    def make(
        self,
        tenants: dict[str, Any],
        may_send_as: list[str],
        *,
        names: tuple[str, ...] = NAMES,
        lease_time: str = "6s",
        retry: dict[str, str] | None = None,
    ) -> list[Host]:
        client_password = "client-" + secrets.token_urlsafe(10)
        for name in names:
            directory = self.base / name
            port = free_port()
            config: dict[str, Any] = {
                "state_directory": str(directory / "state"),
                "helo_name": f"{name}.relayd.test",
                "log_level": "debug",
                "accept_processes": 0,
                "listen": [{"address": f"127.0.0.1:{port}", "auth": "optional", "tls": "none"}],
                "clients": {
                    "app": {
                        "password_hash": hash_password(client_password),
                        "may_send_as": may_send_as,
                    },
                },
                "spool": {"retry": retry or {"first": "1s", "max": "2s", "give_up_after": "1h"}},
                "tokens": {"key": {"file": str(self.token_key)}},
                "tenants": tenants,
                "fleet": {
                    "database": {"file": str(self.dsn)},
                    "name": name,
                    "lease_time": lease_time,
                },
            }
            path = write_config(directory / "relayd.yaml", config)
            host = Host(
                name,
                directory,
                port,
                path,
                Relayd(path, port, directory / "relayd.log"),
                client_password,
            )
            self.hosts.append(host)
        return self.hosts[-len(names) :]

    def init(self) -> None:
        done = self.hosts[0].relayd_cli("fleet", "init")
        assert done.returncode == 0, done.stdout + done.stderr

    def start(self) -> None:
        for host in self.hosts:
            host.relayd.start()

    def kill_all(self) -> None:
        for host in self.hosts:
            host.relayd.kill()


@pytest.fixture
def fleet(tmp_path: Path, fleet_database: str) -> Iterator[Fleet]:
    made = Fleet(tmp_path, fleet_database)
    yield made
    made.kill_all()


def limited_tenant(
    world: MailWorld, secrets_dir: Path, mailbox: Mailbox, port: int, limits: dict[str, int]
) -> dict[str, Any]:
    secret = write_secret(secrets_dir / mailbox.name, mailbox.password)
    return {
        "provider": "custom",
        "smtp": {"host": "127.0.0.1", "port": port, "tls": "none"},
        "limits": limits,
        "accounts": [{"address": mailbox.address, "password": {"file": str(secret)}}],
    }


@pytest.fixture
def upstream(mail_world: MailWorld) -> Iterator[SessionLimitedUpstream]:
    """Microsoft 365's 3 sessions per mailbox, each DATA taking a while: sessions overlap."""
    server = SessionLimitedUpstream(mail_world.lmtp_port, max_sessions=3, data_delay=0.3)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mail_world_upstream_slow(mail_world: MailWorld) -> Iterator[SessionLimitedUpstream]:
    """The same, with each DATA taking a second: a host's sessions last, leases are held."""
    server = SessionLimitedUpstream(mail_world.lmtp_port, max_sessions=3, data_delay=1.0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def most_in_a_minute(arrivals: list[float]) -> int:
    ordered = sorted(arrivals)
    return max(
        (len([t for t in ordered[i:] if t < start + 60.0]) for i, start in enumerate(ordered)),
        default=0,
    )


def all_spools_empty(hosts: list[Host]) -> bool:
    return all(not any(spooled(h.state).values()) for h in hosts)


# -- the schema ---------------------------------------------------------------------------


def test_fleet_init_creates_the_versioned_schema_and_is_idempotent(
    fleet: Fleet, postgres: PostgresServer, fleet_database: str
) -> None:
    (host,) = fleet.make({}, [], names=("host-a",))
    first = host.relayd_cli("fleet", "init")
    assert first.returncode == 0, first.stderr
    assert f"fleet schema created (version {LATEST})" in first.stdout
    again = host.relayd_cli("fleet", "init")
    assert again.returncode == 0
    assert f"fleet schema is at version {LATEST}: nothing to do" in again.stdout
    database = fleet_database.rsplit("/", 1)[1]
    assert postgres.psql("SELECT max(version) FROM relayd_schema", database) == str(LATEST)
    tables = postgres.psql(
        "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables"
        " WHERE tablename LIKE 'fleet_%'",
        database,
    )
    assert tables.split(",") == [
        "fleet_health",
        "fleet_hosts",
        "fleet_leases",
        "fleet_queues",
        "fleet_sends",
        "fleet_throttle",
        "fleet_tokens",
    ]
    assert postgres.password not in first.stdout + first.stderr


# -- shared tokens ------------------------------------------------------------------------


def test_one_auth_on_a_serves_b_and_c_and_50_messages_cause_one_refresh(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    fleet: Fleet,
    oauth: OAuthServer,
    postgres: PostgresServer,
    fleet_database: str,
) -> None:
    alice, rcpt = new_mailbox("fleettok"), new_mailbox("rcpt")
    tenant = microsoft_tenant(mail_world, oauth, [alice.address])
    a, b, c = fleet.make({"ms": tenant}, [alice.address])
    fleet.init()
    # The consent's access token is under the 10-minute margin: the first use refreshes it.
    oauth.token_lifetime = 300
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    auth = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relayd",
            "-c",
            str(a.config_path),
            "auth",
            alice.address,
            "--device-code",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=REPO,
        env=env,
    )
    try:
        shown = ""
        assert auth.stdout is not None
        while not re.search(r"^\s+[A-Z]{8}$", shown, re.M):
            line = auth.stdout.readline()
            assert line, f"relayd auth ended early:\n{shown}"
            shown += line
        code = re.search(r"^\s+([A-Z]{8})$", shown, re.M).group(1)  # type: ignore[union-attr]
        oauth.approve_device_code(code, alice.address)
        rest, _ = auth.communicate(timeout=60)
    finally:
        if auth.poll() is None:
            auth.kill()
    assert auth.returncode == 0, shown + rest
    assert "Stored in the fleet database too" in rest
    oauth.token_lifetime = 3600
    # B and C have no token file of their own: only the fleet's row.
    for host in (b, c):
        assert not (host.state / "tokens").exists()
    database = fleet_database.rsplit("/", 1)[1]
    sealed = postgres.psql(
        "SELECT encode(sealed, 'escape') FROM fleet_tokens WHERE address = "
        f"'{alice.address.lower()}'",
        database,
    )
    assert sealed.startswith("relayd-tokens-v1")
    assert not any(t in sealed for t in oauth.tokens_of(alice.address))  # sealed, not clear

    before = oauth.count("refresh_token")
    oauth.hold_refreshes()  # the refresh waits at the server while 50 messages queue up
    fleet.start()
    for i, host in enumerate((a, b, c, a, b, c)):
        count = 9 if i < 5 else 5
        host.submit(alice.address, rcpt.address, [f"fleet token {i}-{n}" for n in range(count)])
    wait_until(lambda: oauth.count("refresh_token") > before, 30, "a refresh")
    time.sleep(2)  # every host now wants a token
    oauth.release_refreshes()
    got = mail_world.wait_for_messages(rcpt.name, 50, timeout=120)
    assert len(got) == 50
    assert oauth.count("refresh_token") - before == 1
    for host in (a, b, c):
        assert "status=delivered" in host.relayd.log()
    assert "access token refreshed for the fleet" in "".join(h.relayd.log() for h in (a, b, c))
    for host in (a, b, c):
        assert host.relayd.stop() == 0


# -- shared budgets -------------------------------------------------------------------------


def test_90_messages_over_three_hosts_keep_to_3_sessions_and_30_a_minute(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    fleet: Fleet,
    upstream: SessionLimitedUpstream,
) -> None:
    sender, rcpt = new_mailbox("fleetrate"), new_mailbox("rcpt")
    limits = {"max_connections": 3, "max_messages_per_minute": 30}
    tenant = limited_tenant(mail_world, fleet.secrets, sender, upstream.port, limits)
    hosts = fleet.make({"t": tenant}, [sender.address])
    fleet.init()
    fleet.start()
    for i, host in enumerate(hosts):
        host.submit(sender.address, rcpt.address, [f"rate {i}-{n}" for n in range(30)])

    # Each host's queue for the account, seen from host A.
    def status_shows_all() -> str | None:
        out = hosts[0].relayd_cli("status").stdout
        rows = [line for line in out.splitlines() if line.strip().startswith(sender.address)]
        return out if all(any(h.name in r for r in rows) for h in hosts) else None

    shown = wait_until(status_shows_all, 30, "every host's queue in relayd status")
    assert "fleet (this host: host-a):" in shown and "3 hosts alive" in shown
    got = mail_world.wait_for_messages(rcpt.name, 90, timeout=240)
    assert len(got) == 90
    wait_until(lambda: upstream.delivered >= 90, 10, "the upstream's count")
    print(
        f"sessions: {upstream.sessions}, most at once: {upstream.most_open}, most in a "
        f"minute: {most_in_a_minute(upstream.arrivals)}, "
        f"span: {max(upstream.arrivals) - min(upstream.arrivals):.1f} s"
    )
    assert upstream.refusals == 0  # never a 4th session
    assert upstream.most_open <= 3
    assert most_in_a_minute(upstream.arrivals) <= 30
    assert upstream.delivered == 90
    assert wait_until(lambda: all_spools_empty(hosts), 20, "empty spools")


def test_kill_9_of_the_lease_holder_the_others_continue_after_the_lease_time(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    fleet: Fleet,
    mail_world_upstream_slow: SessionLimitedUpstream,
) -> None:
    upstream = mail_world_upstream_slow
    sender, rcpt = new_mailbox("fleetkill"), new_mailbox("rcpt")
    tenant = limited_tenant(
        mail_world, fleet.secrets, sender, upstream.port, {"max_connections": 3}
    )
    a, b, c = fleet.make({"t": tenant}, [sender.address], lease_time="6s")
    fleet.init()
    fleet.start()
    a.submit(sender.address, rcpt.address, [f"kill a-{n}" for n in range(15)])
    wait_until(lambda: upstream.open == 3, 30, "host A's three sessions")
    b.submit(sender.address, rcpt.address, [f"kill b-{n}" for n in range(8)])
    c.submit(sender.address, rcpt.address, [f"kill c-{n}" for n in range(8)])
    wait_until(lambda: len(upstream.arrivals) >= 4, 30, "a few of A's messages")
    time.sleep(0.5)  # B and C are asking for leases, A holds all three
    killed_at = time.time()
    a.relayd.kill()
    wait_until(lambda: any(t > killed_at for t in upstream.arrivals), 30, "B or C delivering")
    first_after = min(t for t in upstream.arrivals if t > killed_at)
    gap = first_after - killed_at
    print(f"first delivery by B or C {gap:.1f} s after the kill (lease time 6 s)")
    # A's leases run out between 4 s (renewed every 2 s) and 6 s after its last renewal.
    assert 3.0 <= gap <= 6.0 + 5.0
    a.relayd.start()  # nothing lost: A's spool goes out after its restart
    got = mail_world.wait_for_messages(rcpt.name, 31, timeout=120)
    subjects = {re.search(rb"Subject: (kill [abc]-\d+)", m).group(1) for m in got}  # type: ignore[union-attr]
    assert len(subjects) == 31
    assert len(got) <= 31 + 3  # at most the messages A had in flight, twice
    assert upstream.refusals == 0 and upstream.most_open <= 3
    assert wait_until(lambda: all_spools_empty([a, b, c]), 30, "empty spools")


# -- the database goes away ------------------------------------------------------------------


def test_postgres_stopped_30s_under_load_nothing_lost_limits_kept(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    fleet: Fleet,
    postgres: PostgresServer,
    mail_world_upstream_slow: SessionLimitedUpstream,
) -> None:
    upstream = mail_world_upstream_slow
    sender, rcpt = new_mailbox("fleetdown"), new_mailbox("rcpt")
    limits = {"max_connections": 3, "max_messages_per_minute": 120}
    tenant = limited_tenant(mail_world, fleet.secrets, sender, upstream.port, limits)
    hosts = fleet.make({"t": tenant}, [sender.address], lease_time="6s")
    fleet.init()
    fleet.start()
    for i, host in enumerate(hosts):
        host.submit(sender.address, rcpt.address, [f"down {i}-{n}" for n in range(30)])
    wait_until(lambda: len(upstream.arrivals) >= 15, 60, "deliveries under way")
    postgres.stop()
    stopped_at = time.time()
    # Mail is still accepted (250: on this host's disk) with the database gone.
    hosts[1].submit(sender.address, rcpt.address, [f"down late-{n}" for n in range(5)])
    time.sleep(30)
    postgres.start()
    started_at = time.time()
    got = mail_world.wait_for_messages(rcpt.name, 95, timeout=180)
    subjects = {re.search(rb"Subject: (down [\w-]+)", m).group(1) for m in got}  # type: ignore[union-attr]
    assert len(subjects) == 95 and len(got) == 95
    during = [t for t in upstream.arrivals if stopped_at < t < started_at]
    after = [t for t in upstream.arrivals if t > started_at]
    print(
        f"delivered during the outage: {len(during)}, after: {len(after)}; most at once: "
        f"{upstream.most_open}; most in a minute: {most_in_a_minute(upstream.arrivals)}"
    )
    assert during and after  # delivery went on on local shares, and resumed shared
    assert upstream.refusals == 0 and upstream.most_open <= 3
    assert most_in_a_minute(upstream.arrivals) <= 120
    logs = "".join(h.relayd.log() for h in hosts)
    assert "fleet database unreachable" in logs and "fleet database reachable" in logs
    assert postgres.password not in logs
    assert wait_until(lambda: all_spools_empty(hosts), 30, "empty spools")


# -- shared health --------------------------------------------------------------------------


def test_a_pause_on_one_host_is_seen_by_the_other_two_without_a_login(
    mail_world: MailWorld, new_mailbox: NewMailbox, fleet: Fleet
) -> None:
    sender, rcpt = new_mailbox("fleetpause"), new_mailbox("rcpt")
    secret = write_secret(fleet.secrets / sender.name, "wrong-password")
    tenant = {
        "provider": "custom",
        "smtp": {
            "host": "127.0.0.1",
            "port": mail_world.smtp_starttls_port,
            "tls": "starttls",
            "ca_file": str(mail_world.pki.ca_cert),
        },
        "accounts": [{"address": sender.address, "password": {"file": str(secret)}}],
    }
    # retry.max is the probe interval: none falls within the test.
    a, b, c = fleet.make(
        {"t": tenant}, [sender.address], retry={"first": "1s", "max": "1h", "give_up_after": "5d"}
    )
    fleet.init()
    fleet.start()
    a.submit(sender.address, rcpt.address, ["pause a"])
    a.relayd.wait_for_log("ALERT account paused", timeout=30)
    for host in (b, c):
        host.relayd.wait_for_log("paused on fleet host host-a", timeout=15)
    before = len(mail_world.postfix_log())
    b.submit(sender.address, rcpt.address, ["pause b-0", "pause b-1"])
    c.submit(sender.address, rcpt.address, ["pause c-0"])
    wait_until(lambda: len(spooled(b.state)["hold"]) == 2, 15, "B's mail held")
    wait_until(lambda: len(spooled(c.state)["hold"]) == 1, 15, "C's mail held")
    time.sleep(3)
    later = mail_world.postfix_log()[before:]
    assert re.findall(r"SASL \w+ authentication failed", later) == []
    assert "connect from" not in later  # not even a connection
    for host in (b, c):
        log = host.relayd.log()
        assert "ALERT account paused" not in log  # one alert, from A
        assert "status=held" not in log  # no attempt of its own was made
    status = b.relayd_cli("status").stdout
    assert "paused on host-a" in status
    assert mail_world.messages(rcpt.name) == []


def test_revoke_on_one_host_is_not_undone_by_another_hosts_copy(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    fleet: Fleet,
    oauth: OAuthServer,
) -> None:
    alice, rcpt = new_mailbox("fleetrevoke"), new_mailbox("rcpt")
    tenant = microsoft_tenant(mail_world, oauth, [alice.address])
    tenant["oauth"]["revoke_url"] = oauth.revoke_url
    a, b = fleet.make({"ms": tenant}, [alice.address], names=("host-a", "host-b"))
    fleet.init()
    seed_fleet(a, oauth, alice.address)
    fleet.start()
    b.submit(alice.address, rcpt.address, ["before revoke"])
    mail_world.wait_for_messages(rcpt.name, 1, timeout=30)
    # B has its copy of the fleet's tokens now.
    wait_until(
        lambda: (b.state / "tokens").is_dir() and any((b.state / "tokens").iterdir()),
        10,
        "B's copy",
    )
    done = a.relayd_cli("auth", alice.address, "--revoke")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "from the fleet database: no host uses them" in done.stdout
    b.relayd.wait_for_log("a consent changed on a host of the fleet", timeout=15)
    b.submit(alice.address, rcpt.address, ["after revoke"])
    wait_until(lambda: len(spooled(b.state)["hold"]) == 1, 30, "B's mail held")
    assert "revoked on a host of the fleet" in b.relayd.log()
    assert len(mail_world.messages(rcpt.name)) == 1
    assert not any((b.state / "tokens").glob("*.tokens"))  # B's copy is gone too


def seed_fleet(host: Host, server: OAuthServer, address: str) -> None:
    """What `relayd auth` on ``host`` leaves in the fleet's row, through relayd's own API."""
    config = load_config(host.config_path)
    assert config.fleet is not None
    record = StoredTokens(
        address=address,
        flow="delegated",
        refresh_token=server.issue_refresh_token(address, MS_CLIENT),
        consent_id=new_consent_id(),
        updated_at=time.time(),
    )
    sealed = TokenStore(host.state, key=config.tokens_key, fsync=False).seal_record(record)
    problem = publish_consent(config.fleet, address, sealed, record.consent_id, record.updated_at)
    assert problem is None, problem
