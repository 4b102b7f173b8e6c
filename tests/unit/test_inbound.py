"""The SMTP server end to end: a real listener on loopback, a real spool in tmp_path."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import errno
import os
import pwd
import socket
import ssl
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from factories import make_account, make_client, make_config, make_tenant

from relayd.config.model import AuthPolicy, ClientConnections, Config, ListenerConfig, TlsMode
from relayd.core.envelope import Envelope
from relayd.core.queues import Queue
from relayd.errors import SpoolError
from relayd.inbound.datastream import read_data_section
from relayd.inbound.guard import LocalFailures, LoginGuard, SharedFailures
from relayd.inbound.handler import InboundHandler
from relayd.inbound.listeners import Listeners, bind_listeners, start_listeners
from relayd.inbound.server import RelaySMTP, auth_offered, with_enhanced_code
from relayd.passwords import hash_password
from relayd.spool.reception import GroupCommitter, Reception
from relayd.spool.store import Spool

HELO = "app01.acme.example"
PASSWORD = "s3cret pass"
PASSWORD_HASH = hash_password(PASSWORD)
MAX_SIZE = 6 * 2**20
HEAD = (
    b"From: Alice <alice@acme.example>\r\nTo: bob@example.net\r\nSubject: test\r\n"
    b"Date: Fri, 01 Mar 2024 12:00:00 +0000\r\nMessage-ID: <m1@acme.example>\r\n\r\n"
)


def listener(
    host: str | None = "127.0.0.1",
    *,
    auth: AuthPolicy = AuthPolicy.OPTIONAL,
    tls: TlsMode = TlsMode.NONE,
    unix: Path | None = None,
    cert: tuple[Path, Path] | None = None,
) -> ListenerConfig:
    return ListenerConfig(
        tcp_host=None if unix else host,
        tcp_port=None if unix else 0,
        unix_path=unix,
        auth=auth,
        tls=tls,
        certificate=cert[0] if cert else None,
        private_key=cert[1] if cert else None,
        tls_min_version="1.2",
        where="listen[0]: line 1",
    )


def build_config(
    state: Path,
    *,
    listeners: tuple[ListenerConfig, ...] = (),
    anonymous: tuple[str, ...] = ("alice@acme.example", "noreply@acme.example"),
    max_size: int = MAX_SIZE,
) -> Config:
    alice = make_account("alice@acme.example", aliases=["frontdesk@acme.example"])
    accounts = [replace(alice, from_name="Alice Example"), make_account("bob@acme.example")]
    accounts.append(make_account("noreply@acme.example"))
    unix_user = pwd.getpwuid(os.getuid()).pw_name
    config = make_config(
        clients=[
            make_client("anonymous", may_send_as=anonymous),
            make_client("crm", password_hash=PASSWORD_HASH, may_send_as=["alice@acme.example"]),
            make_client("webapp", unix_users=[unix_user], may_send_as=["*@acme.example"]),
        ],
        tenants=[make_tenant("acme", accounts=accounts)],
        rewrite_senders={"root": "noreply@acme.example"},
        state_directory=state,
        helo_name=HELO,
    )
    spool = replace(config.spool, max_message_size=max_size)
    return replace(config, listeners=listeners or (listener(),), spool=spool)


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def reply(self) -> str:
        lines: list[str] = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 10)
            if not line:
                return "\n".join(lines) if lines else "<closed>"
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    async def replies(self, count: int) -> list[str]:
        return [await self.reply() for _ in range(count)]

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def cmd(self, line: str | bytes) -> str:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply()

    async def start_message(
        self, sender: str = "alice@acme.example", rcpt: str = "bob@x.example"
    ) -> None:
        assert (await self.cmd(f"MAIL FROM:<{sender}>")).startswith("250 2.1.0")
        assert (await self.cmd(f"RCPT TO:<{rcpt}>")).startswith("250 2.1.5")
        assert (await self.cmd("DATA")).startswith("354")

    async def auth_plain(self, login: str, password: str) -> str:
        blob = base64.b64encode(f"\0{login}\0{password}".encode()).decode()
        return await self.cmd(f"AUTH PLAIN {blob}")


@dataclass
class Relay:
    handler: InboundHandler
    listeners: Listeners
    spool: Spool
    queued: list[str] = field(default_factory=list)
    clients: list[Client] = field(default_factory=list)

    async def connect(
        self, *, ehlo: bool = True, ssl_context: ssl.SSLContext | None = None
    ) -> Client:
        address = self.listeners.addresses()[0]
        if address.startswith("unix:"):
            reader, writer = await asyncio.open_unix_connection(address[5:])
        else:
            port = int(address.rpartition(":")[2])
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl_context)
        client = Client(reader, writer)
        self.clients.append(client)
        assert (await client.reply()).startswith(f"220 {HELO} ESMTP")
        if ehlo:
            assert (await client.cmd("EHLO client.example")).startswith("250-")
        return client

    def files(self, queue: str) -> list[str]:
        return sorted(os.listdir(self.spool.root / queue))

    def message(self, queue_id: str) -> tuple[Envelope, bytes]:
        stored = self.spool.load(queue_id, Queue.INCOMING)
        return stored.envelope, stored.read_content()


Start = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    relays: list[Relay] = []

    async def _start(config: Config | None = None, *, spool: Spool | None = None) -> Relay:
        config = config or build_config(tmp_path)
        spool = spool or Spool(tmp_path)
        spool.prepare()
        queued: list[str] = []
        local = frozenset({"localhost", HELO})
        handler = InboundHandler(config, spool, lambda qid, account: queued.append(qid), local)
        relay = Relay(
            handler, await start_listeners(handler, bind_listeners(config.listeners)), spool, queued
        )
        relays.append(relay)
        return relay

    yield _start
    for relay in relays:
        await relay.listeners.close(grace=0)
        for client in relay.clients:
            client.writer.close()
            with contextlib.suppress(Exception):
                await client.writer.wait_closed()


async def test_message_is_spooled_byte_exact(start: Start) -> None:
    relay = await start()
    client = await relay.connect()
    await client.start_message(rcpt="bob@example.net")
    body = b"..leading dot\r\nbare lf\nbare cr\rgr\xc3\xbc\xc3\x9fe\r\n..\r\nend.\r\n"
    reply = await client.cmd(HEAD + body + b".")
    assert reply.startswith("250 2.0.0 queued as ")
    queue_id = reply.rpartition(" ")[2]
    assert relay.files("incoming") == [queue_id] and relay.files("tmp") == []
    assert relay.queued == [queue_id]
    envelope, content = relay.message(queue_id)
    assert (
        content
        == HEAD + b".leading dot\r\nbare lf\r\nbare cr\r\ngr\xc3\xbc\xc3\x9fe\r\n.\r\nend.\r\n"
    )
    assert envelope.queue_id == queue_id and envelope.client == "anonymous"
    assert envelope.sender == envelope.account == "alice@acme.example"
    assert envelope.recipients == ("bob@example.net",) and envelope.tenant == "acme"
    assert envelope.peer.startswith("127.0.0.1:")


# (what follows the 354, the content before the end of DATA, what stays for the command loop)
DATA_STREAMS = [
    (b".\r\nQUIT\r\n", b"", b"QUIT\r\n"),
    (b"a\r\n.\r\nQUIT\r\n", b"a\r\n", b"QUIT\r\n"),
    (b"\r\n.\r\n", b"\r\n", b""),
    (b"x.\r\n.\r\nNEXT", b"x.\r\n", b"NEXT"),
    (b"..\r\n.x\r\n.\r\n", b"..\r\n.x\r\n", b""),
    (
        b"a\n.\nb\n.\r\nc\r.\r\nd\r\n.\re\r\n\x00.\r\n\r\n.\r\nR",
        b"a\n.\nb\n.\r\nc\r.\r\nd\r\n.\re\r\n\x00.\r\n\r\n",
        b"R",
    ),
    (b"y" * 50 + b"\r\n.\r\n.\r\n", b"y" * 50 + b"\r\n", b".\r\n"),
]


@pytest.mark.parametrize(("stream", "content", "rest"), DATA_STREAMS)
@pytest.mark.parametrize("read_limit", [3, 4, 5, 7, 1 << 18])
@pytest.mark.parametrize("piece", [1, 2, 3, 1000])
async def test_read_data_section(
    stream: bytes, content: bytes, rest: bytes, read_limit: int, piece: int
) -> None:
    reader = asyncio.StreamReader(limit=1001)

    async def arrive() -> None:
        for i in range(0, len(stream), piece):
            reader.feed_data(stream[i : i + piece])
            await asyncio.sleep(0)
        reader.feed_eof()

    arriving = asyncio.create_task(arrive())
    fed: list[bytes] = []
    await read_data_section(reader, fed.append, read_limit=read_limit)
    await arriving
    assert b"".join(fed) == content
    assert await reader.read() == rest
    assert reader._limit == 1001  # type: ignore[attr-defined]


SMUGGLED = (
    b"MAIL FROM:<alice@acme.example>\r\nRCPT TO:<eve@evil.example>\r\nDATA\r\n"
    b"From: alice@acme.example\r\n\r\nsmuggled\r\n"
)


@pytest.mark.parametrize(
    "sequence",
    [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\r\n\x00.\r\n", b"\r\n.\n", b"\n..\r\n"],
)
async def test_smuggling_sequences_do_not_end_data(start: Start, sequence: bytes) -> None:
    relay = await start()
    client = await relay.connect()
    await client.start_message()
    client.send(HEAD + b"first" + sequence + SMUGGLED + b"\r\n.\r\nQUIT\r\n")
    replies = await client.replies(3)
    if b"\x00" in sequence:
        assert replies[0].startswith("554 5.6.0 NUL")
        assert relay.files("incoming") == []
    else:
        assert replies[0].startswith("250 2.0.0 queued as ")
        [queue_id] = relay.files("incoming")
        envelope, content = relay.message(queue_id)
        assert envelope.recipients == ("bob@x.example",)
        assert b"RCPT TO:<eve@evil.example>" in content and content.endswith(b"smuggled\r\n\r\n")
    assert replies[1].startswith("221 2.0.0") and replies[2] == "<closed>"
    assert relay.files("tmp") == []


async def test_nul_is_refused_and_the_session_goes_on(start: Start) -> None:
    relay = await start()
    client = await relay.connect()
    await client.start_message()
    assert await client.cmd(HEAD + b"a\x00b\r\n.") == "554 5.6.0 NUL characters are not allowed"
    assert relay.files("incoming") == [] and relay.files("tmp") == []
    await client.start_message()
    assert (await client.cmd(HEAD + b"fine\r\n.")).startswith("250 2.0.0")


async def test_size_limits(start: Start, tmp_path: Path) -> None:
    relay = await start(build_config(tmp_path, max_size=1000))
    client = await relay.connect()
    reply = await client.cmd("MAIL FROM:<alice@acme.example> SIZE=1001")
    assert reply == "552 5.3.4 Message size exceeds fixed maximum message size"
    assert (await client.cmd("MAIL FROM:<alice@acme.example> SIZE=1000")).startswith("250")
    assert (await client.cmd("RCPT TO:<bob@x.example>")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    reply = await client.cmd(HEAD + b"x" * 2000 + b"\r\n.")
    assert reply == "552 5.3.4 Message size exceeds fixed maximum message size"
    assert relay.files("incoming") == [] and relay.files("tmp") == []
    ehlo = await client.cmd("EHLO again")
    assert "250-SIZE 1000" in ehlo


async def test_ehlo_and_enhanced_codes(start: Start) -> None:
    relay = await start()
    client = await relay.connect(ehlo=False)
    ehlo = (await client.cmd("EHLO client.example")).splitlines()
    assert ehlo[0] == f"250-{HELO}"
    for keyword in ("SIZE 6291456", "8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES"):
        assert f"250-{keyword}" in ehlo
    assert "250-AUTH PLAIN LOGIN" in ehlo and not any("STARTTLS" in line for line in ehlo)
    assert await client.cmd("RCPT TO:<a@b.example>") == "503 5.5.1 Error: need MAIL command"
    assert await client.cmd("NOOP") == "250 2.0.0 OK"
    assert (await client.cmd("FOO")).startswith("500 5.5.2 ")
    assert await client.cmd("QUIT") == "221 2.0.0 Bye"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("250 OK", "250 2.0.0 OK"),
        ("503 Error: nested MAIL command", "503 5.5.1 Error: nested MAIL command"),
        ("550 5.7.1 own code", "550 5.7.1 own code"),
        ("421 4.7.0 Too many", "421 4.7.0 Too many"),
        ("599 Odd", "599 5.0.0 Odd"),
        ("354 End data", "354 End data"),
        ("334 VXNlcm5hbWU6", "334 VXNlcm5hbWU6"),
    ],
)
def test_with_enhanced_code(reply: str, expected: str) -> None:
    assert with_enhanced_code(reply) == expected


@pytest.mark.parametrize(
    ("host", "auth", "tls_active", "offered"),
    [
        ("192.0.2.10", AuthPolicy.OPTIONAL, False, False),  # plain beyond loopback: never
        ("192.0.2.10", AuthPolicy.REQUIRED, False, False),
        ("0.0.0.0", AuthPolicy.REQUIRED, False, False),
        ("192.0.2.10", AuthPolicy.REQUIRED, True, True),
        ("127.0.0.1", AuthPolicy.OPTIONAL, False, True),
        ("::1", AuthPolicy.OPTIONAL, False, True),
        ("127.0.0.1", AuthPolicy.NONE, True, False),
        (None, AuthPolicy.OPTIONAL, False, True),  # unix socket
    ],
)
def test_auth_offered(host: str | None, auth: AuthPolicy, tls_active: bool, offered: bool) -> None:
    config = listener(host, auth=auth, unix=Path("/run/x.sock") if host is None else None)
    assert auth_offered(config, tls_active) is offered


async def test_auth_none_and_auth_required(start: Start, tmp_path: Path) -> None:
    none = listener(auth=AuthPolicy.NONE)
    relay = await start(build_config(tmp_path, listeners=(none,)))
    client = await relay.connect(ehlo=False)
    assert "AUTH" not in await client.cmd("EHLO x")
    assert await client.auth_plain("crm", PASSWORD) == "502 5.5.1 AUTH not available"
    await relay.listeners.close(grace=0)

    required = listener(auth=AuthPolicy.REQUIRED)
    relay = await start(build_config(tmp_path, listeners=(required,)))
    client = await relay.connect()
    assert await client.cmd("MAIL FROM:<alice@acme.example>") == "530 5.7.0 Authentication required"
    assert await client.auth_plain("crm", PASSWORD) == "235 2.7.0 Authentication successful"
    assert (await client.cmd("MAIL FROM:<alice@acme.example>")).startswith("250 2.1.0")


async def test_auth_identifies_the_client(start: Start) -> None:
    relay = await start()
    client = await relay.connect()
    assert await client.cmd("AUTH LOGIN") == "334 VXNlciBOYW1lAA=="
    assert await client.cmd(base64.b64encode(b"crm")) == "334 UGFzc3dvcmQA"
    assert await client.cmd(base64.b64encode(PASSWORD.encode())) == (
        "235 2.7.0 Authentication successful"
    )
    reply = await client.cmd("MAIL FROM:<bob@acme.example>")
    assert reply.startswith("550 5.7.1 <bob@acme.example>: client crm may not send as")
    await client.start_message()
    assert (await client.cmd(HEAD + b"hi\r\n.")).startswith("250 2.0.0")
    envelope, _ = relay.message(relay.files("incoming")[0])
    assert envelope.client == "crm" and envelope.account == "alice@acme.example"


async def test_failed_logins_lock_the_address_out(start: Start) -> None:
    relay = await start()
    client = await relay.connect()
    for _ in range(5):
        reply = await client.auth_plain("crm", "wrong")
        assert reply == "535 5.7.8 Authentication credentials invalid"
    assert await client.auth_plain("crm", PASSWORD) == (
        "421 4.7.0 Too many failed logins, try again later"
    )
    assert await client.reply() == "<closed>"
    client = await relay.connect()  # still locked out, even with the right password
    assert (await client.auth_plain("crm", PASSWORD)).startswith("421 4.7.0")


@pytest.mark.parametrize("shared", [False, True], ids=["one-process", "shared-file"])
def test_login_guard_with_a_clock(tmp_path: Path, shared: bool) -> None:
    now = [1000.0]
    book = SharedFailures.create(tmp_path) if shared else LocalFailures()
    guard = LoginGuard(book, lambda: now[0])
    for _ in range(4):
        guard.failed("192.0.2.1")
        now[0] += 14
    assert not guard.blocked("192.0.2.1")  # 4 failures within 56 s
    now[0] += 10  # the first failure is now older than 60 s
    guard.failed("192.0.2.1")
    assert not guard.blocked("192.0.2.1")
    guard.failed("192.0.2.1")
    assert guard.blocked("192.0.2.1") and not guard.blocked("192.0.2.2")
    now[0] += 59.9
    assert guard.blocked("192.0.2.1")
    now[0] += 0.2
    assert not guard.blocked("192.0.2.1")


def test_processes_share_one_count_of_failed_logins(tmp_path: Path) -> None:
    # Each accepting process maps the same file: five failures spread over three of them
    # block the address in all three.
    first = SharedFailures.create(tmp_path)
    books = [first, SharedFailures(first.path), SharedFailures(first.path)]
    guards = [LoginGuard(book, lambda: 500.0) for book in books]
    for i in range(4):
        guards[i % 3].failed("192.0.2.7")
    assert not any(g.blocked("192.0.2.7") for g in guards)
    guards[1].failed("192.0.2.7")
    assert all(g.blocked("192.0.2.7") for g in guards)
    assert not any(g.blocked("192.0.2.8") for g in guards)
    assert first.path.stat().st_mode & 0o777 == 0o600


async def test_no_auth_payload_in_logs(start: Start, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    relay = await start()
    client = await relay.connect()
    blob = base64.b64encode(f"\0crm\0{PASSWORD}".encode()).decode()
    await client.cmd(f"AUTH PLAIN {blob}")
    client = await relay.connect()
    await client.cmd("AUTH LOGIN")
    await client.cmd(base64.b64encode(b"crm"))
    await client.cmd(base64.b64encode(PASSWORD.encode()))
    await client.cmd(base64.b64encode(PASSWORD.encode()))  # a stray credential line
    assert PASSWORD not in caplog.text and blob not in caplog.text
    assert base64.b64encode(PASSWORD.encode()).decode() not in caplog.text


async def test_client_allowed_a_cannot_use_b(start: Start) -> None:
    relay = await start()
    client = await relay.connect()
    assert (await client.auth_plain("crm", PASSWORD)).startswith("235")  # alice only
    reply = await client.cmd("MAIL FROM:<bob@acme.example>")
    assert reply == "550 5.7.1 <bob@acme.example>: client crm may not send as this address"
    await client.start_message()
    head = HEAD.replace(b"From: Alice <alice@", b"From: Bob <bob@")
    reply = await client.cmd(head + b"hi\r\n.")
    assert reply.startswith("550 5.7.1 From: <bob@acme.example> is not the sender")
    await client.start_message()
    reply = await client.cmd(b"Sender: bob@acme.example\r\n" + HEAD + b"hi\r\n.")
    assert reply.startswith("550 5.7.1 Sender: <bob@acme.example>")
    await client.start_message()
    reply = await client.cmd(
        HEAD.replace(b"From: Alice", b"From: Alice <frontdesk@acme.example>, B") + b"."
    )
    assert reply.startswith("550 5.7.1 From: header names 2 mailboxes")
    assert relay.files("incoming") == [] and relay.files("tmp") == []


async def test_anonymous_may_send_as_nothing_by_default(start: Start, tmp_path: Path) -> None:
    relay = await start(build_config(tmp_path, anonymous=()))
    client = await relay.connect()
    reply = await client.cmd("MAIL FROM:<noreply@acme.example>")
    assert reply.startswith("550 5.7.1 <noreply@acme.example>: client anonymous may not send")


async def test_rewrite_senders_rewrites_envelope_and_from(start: Start) -> None:
    relay = await start()
    client = await relay.connect()
    assert (await client.cmd("MAIL FROM:<root>")).startswith("250 2.1.0")
    assert (await client.cmd("RCPT TO:<ops@example.net>")).startswith("250")
    assert (await client.cmd("DATA")).startswith("354")
    reply = await client.cmd(b"From: root (Cron Daemon)\r\nSubject: cron\r\n\r\nout\r\n.")
    assert reply.startswith("250 2.0.0")
    envelope, content = relay.message(relay.files("incoming")[0])
    assert envelope.sender == "noreply@acme.example"
    head, _, body = content.partition(b"\r\n\r\n")
    assert head.startswith(b"Date: ") and b"\r\nMessage-ID: <" in head
    assert head.endswith(b'\r\nFrom: "Cron Daemon" <noreply@acme.example>\r\nSubject: cron')
    assert body == b"out\r\n"


NMAP_IP, NMAP_DOMAIN = "192.0.2.25", "nmap.scanme.org"
NMAP_FROM_IP = f"<antispam@[{NMAP_IP}]>"
NMAP_TESTS = [
    ("<>", f"<relaytest@{NMAP_DOMAIN}>"),
    (f"<antispam@{NMAP_DOMAIN}>", f"<relaytest@{NMAP_DOMAIN}>"),
    (f"<antispam@{HELO}>", f"<relaytest@{NMAP_DOMAIN}>"),
    (NMAP_FROM_IP, f"<relaytest@{NMAP_DOMAIN}>"),
    (NMAP_FROM_IP, f"<relaytest%{NMAP_DOMAIN}@[{NMAP_IP}]>"),
    (NMAP_FROM_IP, f"<relaytest%{NMAP_DOMAIN}@{HELO}>"),
    (NMAP_FROM_IP, f'<"relaytest@{NMAP_DOMAIN}">'),
    (NMAP_FROM_IP, f'<"relaytest%{NMAP_DOMAIN}">'),
    (NMAP_FROM_IP, f"<relaytest@{NMAP_DOMAIN}@[{NMAP_IP}]>"),
    (NMAP_FROM_IP, f'<"relaytest@{NMAP_DOMAIN}"@[{NMAP_IP}]>'),
    (NMAP_FROM_IP, f"<relaytest@{NMAP_DOMAIN}@{HELO}>"),
    (NMAP_FROM_IP, f"<@[{NMAP_IP}]:relaytest@{NMAP_DOMAIN}>"),
    (NMAP_FROM_IP, f"<@{HELO}:relaytest@{NMAP_DOMAIN}>"),
    (NMAP_FROM_IP, f"<{NMAP_DOMAIN}!relaytest>"),
    (NMAP_FROM_IP, f"<{NMAP_DOMAIN}!relaytest@[{NMAP_IP}]>"),
    (NMAP_FROM_IP, f"<{NMAP_DOMAIN}!relaytest@{HELO}>"),
]


async def test_nmap_open_relay_forms_are_refused(start: Start, tmp_path: Path) -> None:
    relay = await start(build_config(tmp_path, anonymous=()))  # the default: nothing
    client = await relay.connect()
    for sender, recipient in NMAP_TESTS:
        mail = await client.cmd(f"MAIL FROM:{sender}")
        assert mail.startswith("550 5.7.1 ") or mail.startswith("553 5.1.3 "), sender
        rcpt = await client.cmd(f"RCPT TO:{recipient}")
        assert rcpt.startswith("503 5.5.1") or rcpt.startswith("553"), recipient
        assert (await client.cmd("DATA")).startswith("503 5.5.1")
        await client.cmd("RSET")
    # An authorised sender does not make the odd recipient forms acceptable either.
    await client.auth_plain("crm", PASSWORD)
    for _, recipient in NMAP_TESTS[4:]:
        assert (await client.cmd("MAIL FROM:<alice@acme.example>")).startswith("250")
        assert (await client.cmd(f"RCPT TO:{recipient}")).startswith("553 5.1.3 "), recipient
        assert (await client.cmd("DATA")).startswith("503 5.5.1")
        await client.cmd("RSET")
    assert relay.files("incoming") == [] and relay.files("tmp") == []


class FullReception(Reception):
    """A disk that fills up after the first kilobyte of a message."""

    def write(self, chunk: bytes) -> None:
        if self.length + len(chunk) > 1024:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().write(chunk)


class FullSpool(Spool):
    def receive(self, envelope: Envelope) -> Reception:
        return FullReception(envelope, self.root / "tmp" / envelope.queue_id, self.committer)


class BrokenCommitter(GroupCommitter):
    def submit(
        self, reception: Reception, on_durable: Callable[[], None] | None = None
    ) -> asyncio.Future[None]:
        reception.abort()
        failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        failed.set_exception(SpoolError("cannot sync spool directory: No space left on device"))
        return failed


@pytest.mark.parametrize("where", ["write", "commit"])
async def test_spool_failure_is_452_and_leaves_no_file(
    start: Start, tmp_path: Path, where: str
) -> None:
    spool = FullSpool(tmp_path) if where == "write" else Spool(tmp_path)
    if where == "commit":
        spool.committer = BrokenCommitter(spool.directory(Queue.INCOMING))
    relay = await start(spool=spool)
    client = await relay.connect()
    await client.start_message()
    assert (
        await client.cmd(HEAD + b"x" * 5000 + b"\r\n.") == "452 4.3.1 Insufficient system storage"
    )
    assert relay.files("incoming") == [] and relay.files("tmp") == [] and relay.queued == []
    assert (await client.cmd("NOOP")).startswith("250")


async def test_empty_message(start: Start) -> None:
    relay = await start()
    client = await relay.connect()
    await client.start_message()
    client.send(b".\r\nQUIT\r\n")  # the CRLF before this dot ended the DATA command
    replies = await client.replies(2)
    assert replies[0].startswith("250 2.0.0 queued as ") and replies[1].startswith("221")
    _, content = relay.message(relay.files("incoming")[0])
    lines = content.split(b"\r\n")
    assert lines[0] == b'From: "Alice Example" <alice@acme.example>'
    assert lines[1].startswith(b"Date: ") and lines[2].startswith(b"Message-ID: <")
    assert lines[3:] == [b""]


async def test_five_mib_message_byte_exact(start: Start) -> None:
    relay = await start()
    client = await relay.connect()
    await client.start_message()
    lines = [base64.b64encode(os.urandom(57)) for _ in range(5 * 2**20 // 78)]
    lines[100:100] = [b".", b"..starts with a dot", b"." * 3]
    body = b"\r\n".join(lines) + b"\r\n" + b"y" * 300_000 + b"\r\n"  # and one long line
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    client.send(HEAD + stuffed + b".\r\n")
    reply = await client.reply()
    assert reply.startswith("250 2.0.0 queued as ")
    _, content = relay.message(reply.rpartition(" ")[2])
    assert len(content) > 5 * 2**20 and content == HEAD + body


async def test_pipelined_commands_around_the_final_dot(start: Start) -> None:
    relay = await start()
    client = await relay.connect()
    client.send(b"MAIL FROM:<alice@acme.example>\r\nRCPT TO:<a@x.example>\r\nDATA\r\n")
    assert [r[:3] for r in await client.replies(3)] == ["250", "250", "354"]
    client.send(
        HEAD + b"one\r\n.\r\nMAIL FROM:<alice@acme.example>\r\nRCPT TO:<b@x.example>\r\nDATA\r\n"
    )
    assert [r[:9] for r in await client.replies(4)] == [
        "250 2.0.0",
        "250 2.1.0",
        "250 2.1.5",
        "354 End d",
    ]
    client.send(HEAD + b"two\r\n.\r\nQUIT\r\n")
    assert [r[:9] for r in await client.replies(2)] == ["250 2.0.0", "221 2.0.0"]
    recipients = sorted(relay.message(q)[0].recipients for q in relay.files("incoming"))
    assert recipients == [("a@x.example",), ("b@x.example",)]


async def test_header_section_too_large(start: Start) -> None:
    relay = await start()
    client = await relay.connect()
    await client.start_message()
    fields = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"f" * 1000) for i in range(1100))
    assert await client.cmd(fields + HEAD + b"body\r\n.") == "552 5.3.4 Header section too large"
    assert relay.files("incoming") == [] and relay.files("tmp") == []


async def test_internal_error_is_451_without_details(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = await start()

    def broken(*args: object) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(relay.handler, "open_message", broken)
    client = await relay.connect()
    assert (await client.cmd("MAIL FROM:<alice@acme.example>")).startswith("250")
    assert (await client.cmd("RCPT TO:<bob@x.example>")).startswith("250")
    assert await client.cmd("DATA") == "451 4.3.0 Internal error"


async def test_unix_listener_identifies_the_peer_user(start: Start, tmp_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="relayd-") as directory:
        path = Path(directory) / "smtp.sock"
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(path))
        stale.close()  # a socket file nobody listens on, as a killed daemon leaves it
        relay = await start(build_config(tmp_path, listeners=(listener(unix=path),)))
        assert stat.S_IMODE(path.stat().st_mode) == 0o666
        client = await relay.connect(ehlo=False)
        assert "250-AUTH PLAIN LOGIN" in await client.cmd("EHLO local")
        await client.start_message(sender="bob@acme.example")  # webapp: *@acme.example
        assert (await client.cmd(b"Subject: x\r\n\r\nhi\r\n.")).startswith("250 2.0.0")
        envelope, _ = relay.message(relay.files("incoming")[0])
        assert (envelope.client, envelope.peer) == ("webapp", "unix")
        await relay.listeners.close(grace=0)
        assert not path.exists()


async def test_unix_users_may_name_the_peer_by_uid(start: Start, tmp_path: Path) -> None:
    config = build_config(tmp_path, listeners=(listener(unix=tmp_path / "smtp.sock"),))
    by_uid = replace(config.clients["webapp"], unix_users=(str(os.getuid()),))
    relay = await start(replace(config, clients={**config.clients, "webapp": by_uid}))
    client = await relay.connect(ehlo=False)
    await client.cmd("EHLO local")
    await client.start_message(sender="bob@acme.example")  # only webapp may: *@acme.example
    assert (await client.cmd(b"Subject: x\r\n\r\nhi\r\n.")).startswith("250 2.0.0")
    envelope, _ = relay.message(relay.files("incoming")[0])
    assert envelope.client == "webapp"


def make_certificate(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # a throw-away self-signed certificate
    return context


async def test_starttls(start: Start, tmp_path: Path) -> None:
    cert = make_certificate(tmp_path)
    config = build_config(tmp_path, listeners=(listener(tls=TlsMode.STARTTLS, cert=cert),))
    relay = await start(config)
    client = await relay.connect(ehlo=False)
    assert "250-STARTTLS" in await client.cmd("EHLO x")
    # Plaintext sent along with STARTTLS is discarded (CVE-2011-0411, CVE-2024-34083).
    client.send(b"STARTTLS\r\nMAIL FROM:<alice@acme.example>\r\n")
    assert await client.reply() == "220 2.0.0 Ready to start TLS"
    await client.writer.start_tls(client_context())
    ehlo = await client.cmd("EHLO x")
    assert "STARTTLS" not in ehlo and "250-AUTH PLAIN LOGIN" in ehlo
    assert await client.cmd("STARTTLS") == "503 5.5.1 TLS already active"
    assert (await client.auth_plain("crm", PASSWORD)).startswith("235")
    await client.start_message()
    assert (await client.cmd(HEAD + b"secret\r\n.")).startswith("250 2.0.0")


async def test_implicit_tls(start: Start, tmp_path: Path) -> None:
    cert = make_certificate(tmp_path)
    config = build_config(tmp_path, listeners=(listener(tls=TlsMode.IMPLICIT, cert=cert),))
    relay = await start(config)
    client = await relay.connect(ehlo=False, ssl_context=client_context())
    ehlo = await client.cmd("EHLO x")
    assert "STARTTLS" not in ehlo and "250-AUTH PLAIN LOGIN" in ehlo
    await client.start_message()
    assert (await client.cmd(HEAD + b"hi\r\n.")).startswith("250 2.0.0")
    assert relay.listeners.reload(config) == []  # certificates re-read in place
    client = await relay.connect(ssl_context=client_context())


async def test_close_tells_idle_clients(start: Start) -> None:
    relay = await start()
    client = await relay.connect()
    await relay.listeners.close(grace=1)
    assert await client.reply() == "421 4.3.2 Service shutting down"
    assert await client.reply() == "<closed>"


@pytest.mark.parametrize(
    "arg",
    [
        "<alice@acme.example>",
        "<alice@acme.example> SIZE=100 BODY=8BITMIME",
        "  <a.b+c@mail.acme.example>",
        "<o'brien@acme.example>x",
        "<>",
        '<"quoted local"@acme.example>',
        "<alice@[192.0.2.1]>",
        "alice@acme.example",
    ],
)
def test_path_fast_path_agrees_with_aiosmtpd(arg: str) -> None:
    from aiosmtpd.smtp import SMTP

    protocol = object.__new__(RelaySMTP)
    assert RelaySMTP._getaddr(protocol, arg) == SMTP._getaddr(protocol, arg)


async def test_reload_applies_auth_and_keeps_old_certificates_on_error(
    start: Start, tmp_path: Path
) -> None:
    cert = make_certificate(tmp_path)
    tls = listener(tls=TlsMode.STARTTLS, cert=cert)
    relay = await start(build_config(tmp_path, listeners=(tls,)))
    broken = replace(tls, certificate=tmp_path / "missing.pem")
    with pytest.raises(OSError):
        relay.listeners.reload(build_config(tmp_path, listeners=(broken,)))
    client = await relay.connect()
    assert (await client.cmd("STARTTLS")).startswith("220")
    await client.writer.start_tls(client_context())
    assert "AUTH" in await client.cmd("EHLO x")

    no_auth = replace(tls, auth=AuthPolicy.NONE)
    unix = listener(unix=tmp_path / "new.sock")
    notes = relay.listeners.reload(build_config(tmp_path, listeners=(no_auth, unix)))
    assert notes == [f"{unix.display}: new listener, opened at the next start"]
    client = await relay.connect(ehlo=False)
    assert "AUTH" not in await client.cmd("EHLO x")


async def test_client_gone_in_the_middle_of_data_leaves_no_file(start: Start) -> None:
    relay = await start()
    client = await relay.connect()
    await client.start_message()
    client.send(HEAD + b"x" * 300_000)
    await client.writer.drain()
    for _ in range(100):  # until the server has opened the spool file
        if relay.files("tmp"):
            break
        await asyncio.sleep(0.01)
    assert relay.files("tmp")
    client.writer.close()
    for _ in range(100):
        if not relay.files("tmp"):
            break
        await asyncio.sleep(0.01)
    assert relay.files("tmp") == [] and relay.files("incoming") == []


@pytest.mark.parametrize(
    ("peer", "expected"),
    [("::ffff:192.0.2.1", "192.0.2.1"), ("::1", "::1"), ("192.0.2.1", "192.0.2.1")],
)
def test_ipv4_mapped_peers_are_ipv4(peer: str, expected: str) -> None:
    from relayd.inbound.server import _plain_ip

    assert _plain_ip(peer) == expected


# -- what a client may hold (client_connections) --------------------------------------------


def limited(tmp_path: Path, **limits: Any) -> Config:
    config = build_config(tmp_path)
    return replace(config, client_connections=replace(ClientConnections(), **limits))


async def test_one_connection_over_the_cap_is_turned_away(start: Start, tmp_path: Path) -> None:
    relay = await start(limited(tmp_path, max=2))
    first, second = await relay.connect(), await relay.connect()
    address = relay.listeners.addresses()[0]
    reader, writer = await asyncio.open_connection(*address.rsplit(":", 1))
    assert (await reader.readline()).startswith(b"421 4.7.0 Too many connections")
    assert await reader.read() == b""  # and closed
    writer.close()
    await first.cmd("QUIT")  # one leaves: the next one gets in
    await asyncio.sleep(0.05)
    third = await relay.connect()
    assert (await third.cmd("NOOP")).startswith("250")
    assert (await second.cmd("NOOP")).startswith("250")


async def test_a_connection_that_says_nothing_is_closed_early(start: Start, tmp_path: Path) -> None:
    relay = await start(limited(tmp_path, silent_timeout=0.3, idle_timeout=30))
    silent = await relay.connect(ehlo=False)  # the greeting, then nothing
    talking = await relay.connect()  # it said EHLO: the idle timeout applies now
    await asyncio.sleep(0.6)
    assert (await silent.reply()).startswith("421 4.4.2 Timeout")
    assert (await talking.cmd("NOOP")).startswith("250")


async def test_a_trickle_of_data_cannot_hold_the_session(start: Start, tmp_path: Path) -> None:
    relay = await start(limited(tmp_path, idle_timeout=0.4, min_data_rate=1000))
    client = await relay.connect()
    await client.start_message()
    for _ in range(4):  # a ".\r\n"-ended line now and then: the reads go on, the rate not
        client.send(b"x.\r\n")
        await asyncio.sleep(0.2)
    assert await client.reply() == "<closed>"
    assert relay.files("incoming") == [] and relay.queued == []


async def test_commands_without_mail_end_the_session(start: Start, tmp_path: Path) -> None:
    relay = await start(limited(tmp_path, junk_commands=3))
    client = await relay.connect()
    for _ in range(3):
        assert (await client.cmd("NOOP")).startswith("250")
    assert (await client.cmd("RSET")).startswith("421 4.7.0 Too many commands")
    client = await relay.connect()
    for _ in range(3):
        assert (await client.cmd("NOOP")).startswith("250")
    await client.start_message()
    assert (await client.cmd(HEAD + b"body\r\n.")).startswith("250 2.0.0")
    assert (await client.cmd("NOOP")).startswith("250")  # a message sent: counted afresh
