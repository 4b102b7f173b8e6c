"""Throttle replies slow the account's lane as a whole (relayd.core.throttle), the login is
one mechanism sent once, and recipients split by max_recipients keep what they got."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, LoginPassword
from factories import make_account

from relayd.config.model import AccountConfig, Limits, SmtpServer, TlsMode
from relayd.core.outcome import Reply, Verdict, is_throttle
from relayd.core.throttle import FIRST_PAUSE, MAX_PAUSE, RECOVER_AFTER, Throttle
from relayd.upstream.credentials import AccountCredentials, Mechanism
from relayd.upstream.dataphase import BytesContent
from relayd.upstream.delivery import AccountSignal, UpstreamDeliverer
from relayd.upstream.smtp import login_mechanism


@pytest.mark.parametrize(
    ("reply", "throttle"),
    [
        (Reply(421, "4.7.0 Try again later, closing connection"), True),  # Gmail
        (Reply(432, "4.3.2 Concurrent connections limit exceeded"), True),  # Microsoft
        (Reply(421, "4.3.2 The maximum number of concurrent server connections"), True),
        (Reply(454, "4.7.0 Too many login attempts, please try again later"), True),
        (Reply(451, "4.7.500 Server busy. Please try again later"), True),
        (Reply(450, "4.7.1 Rate limited"), True),
        (Reply(451, "4.3.0 Temporary local problem"), False),
        (Reply(450, "4.2.1 Mailbox busy"), False),
        (Reply(421, "4.4.2 Timeout"), False),
        (Reply(554, "5.7.0 Too many messages"), False),
        (Reply(535, "5.7.8 Authentication failed"), False),
    ],
)
def test_throttle_replies(reply: Reply, throttle: bool) -> None:
    assert is_throttle(reply) is throttle


def test_a_throttle_takes_a_connection_and_pauses_the_lane_doubling() -> None:
    t = Throttle()
    assert t.connection_limit(3) == 3 and t.wait(100.0) == 0.0
    t = t.on_throttled(100.0, in_use=3)
    assert t.connection_limit(3) == 2
    assert t.wait(100.0) == FIRST_PAUSE
    t = t.on_throttled(101.0, in_use=2)
    assert t.connection_limit(3) == 1
    assert t.wait(101.0) == 2 * FIRST_PAUSE
    for i in range(20):
        t = t.on_throttled(102.0 + i, in_use=1)
    assert t.connection_limit(3) == 1  # never none at all
    assert t.wait(121.0) == MAX_PAUSE
    assert t.replies == 22
    # What the provider asks for wins (an HTTP Retry-After, say).
    assert Throttle().on_throttled(0.0, in_use=1, retry_after=42.0).wait(0.0) == 42.0


def test_connections_come_back_one_by_one_after_a_calm_spell() -> None:
    t = Throttle().on_throttled(0.0, in_use=3).on_throttled(1.0, in_use=2)
    assert t.connection_limit(3) == 1
    t = t.on_delivered(10.0, limit=3)
    assert t.streak == 0 and t.connection_limit(3) == 1  # not calm long enough
    t = t.on_delivered(1.0 + RECOVER_AFTER, limit=3)
    assert t.connection_limit(3) == 2
    t = t.on_delivered(2.0 + RECOVER_AFTER, limit=3)
    assert t.connection_limit(3) == 2  # the next one only after another calm spell
    t = t.on_delivered(1.0 + 2 * RECOVER_AFTER, limit=3)
    assert t.connections is None and t.connection_limit(3) == 3


@pytest.mark.parametrize(
    ("credential", "offered", "chosen"),
    [
        (Mechanism.PASSWORD, ["login", "plain"], "plain"),
        (Mechanism.PASSWORD, ["cram-md5", "login"], "login"),
        (Mechanism.PASSWORD, ["PLAIN", "XOAUTH2"], "plain"),
        (Mechanism.PASSWORD, ["cram-md5"], None),
        (Mechanism.XOAUTH2, ["plain", "login", "xoauth2"], "xoauth2"),
        (Mechanism.XOAUTH2, ["plain", "login"], None),
        (Mechanism.PASSWORD, [], None),
    ],
)
def test_one_login_mechanism(credential: Mechanism, offered: list[str], chosen: str) -> None:
    assert login_mechanism(credential, offered) == chosen


class Upstream:
    """An SMTP server that refuses every password, and answers MAIL FROM with ``mail``
    from the ``refuse_from``-th transaction on (counted over all connections)."""

    def __init__(self, *, mail: str = "250 2.1.0 Ok", refuse_from: int = 1) -> None:
        self.auth_commands: list[str] = []
        self.transactions = 0
        self.mail = mail
        self.refuse_from = refuse_from
        self.delivered: list[list[str]] = []

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        self.auth_commands.append(mechanism)
        if isinstance(data, LoginPassword) and data.password == b"right":
            return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.transactions += 1
        if self.transactions >= self.refuse_from:
            return self.mail
        envelope.mail_from = address
        return "250 2.1.0 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.delivered.append(list(envelope.rcpt_tos))
        return "250 2.0.0 Ok"


@pytest.fixture
async def upstream_port(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Upstream, int]]:
    upstream: Upstream = request.param
    loop = asyncio.get_running_loop()

    def factory() -> SMTPServer:
        # Plain text on loopback, AUTH offered (PLAIN and LOGIN, as aiosmtpd does).
        return SMTPServer(upstream, auth_require_tls=False, authenticator=upstream.authenticate)

    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        yield upstream, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def account_at(port: int, password: str, **limits: int) -> AccountConfig:
    account = make_account("app@example.test", password=password)
    return dataclasses.replace(
        account,
        smtp=SmtpServer("127.0.0.1", port, TlsMode.NONE, None),
        limits=Limits(**limits),
    )


CONTENT = BytesContent(b"From: <app@example.test>\r\nSubject: s\r\n\r\nbody\r\n")


@pytest.mark.parametrize("upstream_port", [Upstream()], indirect=True)
async def test_a_wrong_password_costs_one_auth_command(upstream_port: tuple[Upstream, int]) -> None:
    upstream, port = upstream_port
    deliverer = UpstreamDeliverer(helo_name="relayd.test", credentials=AccountCredentials())
    report, transport = await deliverer.attempt(
        account_at(port, "wrong"), "app@example.test", ("a@x.test",), CONTENT, None
    )
    assert report.signal is AccountSignal.CREDENTIALS_REFUSED
    assert [r.verdict for r in report.results] == [Verdict.HELD]
    assert upstream.auth_commands == ["PLAIN"]  # not PLAIN, then LOGIN
    assert transport is None


@pytest.mark.parametrize(
    "upstream_port",
    [Upstream(mail="432 4.3.2 Concurrent connections limit exceeded", refuse_from=2)],
    indirect=True,
)
async def test_recipients_split_by_max_recipients_keep_what_they_got(
    upstream_port: tuple[Upstream, int],
) -> None:
    upstream, port = upstream_port
    deliverer = UpstreamDeliverer(helo_name="relayd.test", credentials=AccountCredentials())
    rcpts = tuple(f"r{i}@x.test" for i in range(5))
    report, transport = await deliverer.attempt(
        account_at(port, "right", max_recipients=2), "app@example.test", rcpts, CONTENT, None
    )
    # The first transaction of two went through; the second was throttled, the third is
    # not even tried on this connection: the lane slows down instead.
    assert upstream.delivered == [["r0@x.test", "r1@x.test"]]
    assert [r.verdict for r in report.results] == [Verdict.DELIVERED] * 2 + [Verdict.DEFERRED] * 3
    assert report.signal is AccountSignal.THROTTLED
    assert upstream.transactions == 2
    assert transport is None  # closed: one connection fewer
