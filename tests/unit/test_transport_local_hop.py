"""The upstream session against an in-process SMTP sink (pure delivery logic, no TLS).

A plain loopback upstream marked ``tls: none`` that offers no AUTH (a local MTA hop) gets the
message without a login; one that answers AUTH with something other than 235 gets nothing and
the attempt is not counted as delivered.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult
from factories import make_account

from relayd.config.model import SmtpServer, TlsMode
from relayd.core.outcome import Verdict
from relayd.upstream.credentials import AccountCredentials
from relayd.upstream.dataphase import BytesContent
from relayd.upstream.delivery import UpstreamDeliverer


class Recorder:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope.original_content)
        return "250 2.0.0 Ok"


async def _serve(recorder: Recorder, *, offer_auth: bool) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()

    def refuse_with_250(*_: Any) -> AuthResult:
        # Like smtp-sink: a positive reply that is not RFC 4954's 235.
        return AuthResult(success=False, handled=False, message="250 2.0.0 Ok")

    def factory() -> SMTPServer:
        return SMTPServer(
            recorder,
            # aiosmtpd advertises AUTH on plain connections only when TLS is not required.
            auth_require_tls=not offer_auth,
            authenticator=refuse_with_250 if offer_auth else None,
        )

    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def no_auth_sink() -> AsyncIterator[tuple[Recorder, int]]:
    recorder = Recorder()
    async for port in _serve(recorder, offer_auth=False):
        yield recorder, port


@pytest.fixture
async def bogus_auth_sink() -> AsyncIterator[tuple[Recorder, int]]:
    recorder = Recorder()
    async for port in _serve(recorder, offer_auth=True):
        yield recorder, port


def _account(port: int) -> Any:
    account = make_account("app@example.test", password="pw-for-the-test")
    return dataclasses.replace(account, smtp=SmtpServer("127.0.0.1", port, TlsMode.NONE, None))


CONTENT = b"From: <app@example.test>\r\nSubject: hop\r\n\r\nbody\r\n"


async def test_loopback_hop_without_auth_gets_the_message(
    no_auth_sink: tuple[Recorder, int],
) -> None:
    recorder, port = no_auth_sink
    deliverer = UpstreamDeliverer(helo_name="relayd.test", credentials=AccountCredentials())
    report, session = await deliverer.attempt(
        _account(port), "app@example.test", ("rcpt@example.test",), BytesContent(CONTENT), None
    )
    assert [r.verdict for r in report.results] == [Verdict.DELIVERED]
    assert recorder.messages == [CONTENT]
    if session is not None:
        await session.quit()


async def test_positive_reply_to_auth_is_not_a_delivery(
    bogus_auth_sink: tuple[Recorder, int],
) -> None:
    recorder, port = bogus_auth_sink
    deliverer = UpstreamDeliverer(helo_name="relayd.test", credentials=AccountCredentials())
    report, session = await deliverer.attempt(
        _account(port), "app@example.test", ("rcpt@example.test",), BytesContent(CONTENT), None
    )
    assert [r.verdict for r in report.results] == [Verdict.DEFERRED]
    assert recorder.messages == []
    assert session is None
    # Said as what went wrong, not as "status=deferred (250 2.0.0 Ok)".
    assert "login failed: AUTH answered 250, expected 235" in report.detail
    assert "login failed: AUTH answered 250" in report.results[0].reply
