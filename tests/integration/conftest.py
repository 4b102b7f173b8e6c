"""Fixtures that put relayd between a test client and the real Postfix/Dovecot world."""

from __future__ import annotations

import itertools
import json
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Protocol

import pytest
from mailworld.postgres import PostgresServer, postgres_bin_dir
from mailworld.world import MailWorld

from relayd.passwords import hash_password

from .relayd_proc import Relayd, free_port, write_config, write_secret

_counter = itertools.count(1)


@dataclass
class Mailbox:
    """A Dovecot user that relayd logs in as upstream (its app password)."""

    name: str
    address: str
    password: str


@dataclass
class RelaydSetup:
    """One relayd instance under test, its config and the mailboxes it uses."""

    world: MailWorld
    dir: Path
    port: int
    config_path: Path
    relayd: Relayd
    client_password: str
    config: dict[str, Any] = field(default_factory=dict)

    def rewrite_config(self) -> None:
        write_config(self.config_path, self.config)


#: The ``new_mailbox`` fixture: a fresh Dovecot user whose name starts with the prefix.
NewMailbox = Callable[[str], Mailbox]


class RelaydSetupFactory(Protocol):
    """The ``relayd_setup`` fixture: relayd (not yet started) with these tenants."""

    def __call__(
        self,
        tenants: dict[str, Any],
        *,
        may_send_as: list[str],
        anonymous: list[str] | None = None,
        retry: dict[str, str] | None = None,
    ) -> RelaydSetup: ...


class RelayFor(Protocol):
    """The ``relay_for`` fixture: relayd with one custom-provider account for ``mailbox``."""

    def __call__(
        self,
        mailbox: Mailbox,
        *,
        port: int | None = None,
        tls: str = "starttls",
        password: str | None = None,
    ) -> RelaydSetup: ...


@pytest.fixture
def new_mailbox(mail_world: MailWorld) -> NewMailbox:
    def make(prefix: str) -> Mailbox:
        name = f"{prefix}{next(_counter)}{secrets.token_hex(2)}"
        password = "pw-" + secrets.token_urlsafe(12)
        address = mail_world.add_user(name, password)
        return Mailbox(name, address, password)

    return make


def custom_tenant(
    world: MailWorld,
    secrets_dir: Path,
    mailbox: Mailbox,
    *,
    port: int,
    tls: str,
    password: str | None = None,
) -> dict[str, Any]:
    secret = write_secret(secrets_dir / mailbox.name, password or mailbox.password)
    return {
        "provider": "custom",
        "smtp": {"host": "127.0.0.1", "port": port, "tls": tls, "ca_file": str(world.pki.ca_cert)},
        "accounts": [{"address": mailbox.address, "password": {"file": str(secret)}}],
    }


@pytest.fixture
def relayd_setup(mail_world: MailWorld, tmp_path: Path) -> Iterator[RelaydSetupFactory]:
    started: list[RelaydSetup] = []

    def make(
        tenants: dict[str, Any],
        *,
        may_send_as: list[str],
        anonymous: list[str] | None = None,
        retry: dict[str, str] | None = None,
    ) -> RelaydSetup:
        port = free_port()
        client_password = "client-" + secrets.token_urlsafe(10)
        config: dict[str, Any] = {
            "state_directory": str(tmp_path / "state"),
            "helo_name": "relayd.test",
            "log_level": "debug",
            "listen": [{"address": f"127.0.0.1:{port}", "auth": "optional", "tls": "none"}],
            "clients": {
                "anonymous": {"may_send_as": anonymous or []},
                "app": {
                    "password_hash": hash_password(client_password),
                    "may_send_as": may_send_as,
                },
            },
            "spool": {"retry": retry or {"first": "1s", "max": "2s", "give_up_after": "1h"}},
            "tenants": tenants,
        }
        config_path = write_config(tmp_path / "relayd.yaml", config)
        setup = RelaydSetup(
            world=mail_world,
            dir=tmp_path,
            port=port,
            config_path=config_path,
            relayd=Relayd(config_path, port, tmp_path / "relayd.log"),
            client_password=client_password,
            config=config,
        )
        started.append(setup)
        return setup

    yield make
    for setup in started:
        setup.relayd.kill()


@pytest.fixture
def relay_for(mail_world: MailWorld, relayd_setup: RelaydSetupFactory, tmp_path: Path) -> RelayFor:
    """relayd with one custom-provider account for ``mailbox``, which the client may send as."""

    def make(
        mailbox: Mailbox,
        *,
        port: int | None = None,
        tls: str = "starttls",
        password: str | None = None,
    ) -> RelaydSetup:
        tenant = custom_tenant(
            mail_world,
            tmp_path / "secrets",
            mailbox,
            port=mail_world.smtp_starttls_port if port is None else port,
            tls=tls,
            password=password,
        )
        return relayd_setup({"t": tenant}, may_send_as=[mailbox.address])

    return make


# -- alerts -------------------------------------------------------------------------------


class _Hook(BaseHTTPRequestHandler):
    posts: list[dict[str, Any]]

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.posts.append(json.loads(self.rfile.read(length)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


#: The ``webhook`` fixture: its URL and the JSON bodies POSTed to it so far.
Webhook = tuple[str, list[dict[str, Any]]]


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    yield from _serve_webhook()


@pytest.fixture
def tenant_webhook() -> Iterator[Webhook]:
    """A second webhook endpoint: a tenant's own, beside the top-level one."""
    yield from _serve_webhook()


def _serve_webhook() -> Iterator[Webhook]:
    posts: list[dict[str, Any]] = []
    handler = type("Hook", (_Hook,), {"posts": posts})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", posts
    server.shutdown()
    server.server_close()


# -- fleet mode: a real PostgreSQL server ---------------------------------------------------


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (tests/mailworld/postgres.py)."""
    if postgres_bin_dir() is None:
        pytest.fail("PostgreSQL is not installed (scripts/test installs it)", pytrace=False)
    server = PostgresServer()
    try:
        server.init()
        yield server
    finally:
        server.destroy()


@pytest.fixture
def fleet_database(postgres: PostgresServer) -> Iterator[str]:
    """A fresh database for this test; its URL (with the role's password). The server is
    running again afterwards, whatever the test did to it."""
    yield postgres.new_database()
    if not postgres.running():
        postgres.start()
