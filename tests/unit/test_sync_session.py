"""The IMAP session's wire exchange against a scripted server on loopback.

What Dovecot is checked for lives in tests/integration/test_sent_copy.py; here the exact lines
relayd sends are asserted: AUTHENTICATE with each response on its own line, the empty answer
to an XOAUTH2 error challenge, quoted mailbox names, and that a stalled or vanished server
ends a call at once instead of leaving it waiting.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from factories import make_account

from relayd.config.model import AccountConfig, ImapServer, OAuthConfig, Secret, TlsMode
from relayd.sync.imap import ImapError, ImapFailure, ImapSession, ImapTimeouts

GOOD_TOKEN = "at-" + "x" * 2500  # real tokens are 1.5 KB and more
ERROR_CHALLENGE = base64.b64encode(b'{"status":"401","schemes":"bearer"}')
CAPS = b"IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2 SPECIAL-USE LIST-EXTENDED"


@dataclass
class ScriptedImap:
    """Just enough of an IMAP server; ``mode`` picks a misbehaviour."""

    mode: str = "ok"
    received: list[bytes] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def line() -> bytes:
            data = await reader.readline()
            self.received.append(data)
            return data

        try:
            writer.write(b"* OK [CAPABILITY " + CAPS + b"] ready\r\n")
            while True:
                raw = await line()
                if not raw:
                    return
                tag, _, rest = raw.rstrip(b"\r\n").partition(b" ")
                command = rest.split(b" ")[0].upper()
                if self.mode == "stall" and command == b"LIST":
                    await reader.read()  # no answer, until the client gives up and leaves
                    return
                if command == b"CAPABILITY":
                    writer.write(b"* CAPABILITY " + CAPS + b"\r\n" + tag + b" OK done\r\n")
                elif command == b"AUTHENTICATE":
                    writer.write(b"+ \r\n")
                    blob = (await line()).rstrip(b"\r\n")
                    expected = base64.b64encode(
                        f"user=ops@host.example\x01auth=Bearer {GOOD_TOKEN}\x01\x01".encode()
                    )
                    if rest.endswith(b"PLAIN") or blob == expected:
                        writer.write(tag + b" OK logged in\r\n")
                    else:
                        # What Dovecot does with a refused token (RFC 7628 §3.2.2).
                        writer.write(b"+ " + ERROR_CHALLENGE + b"\r\n")
                        answer = await line()
                        code = b"NO [AUTHENTICATIONFAILED]" if answer == b"\r\n" else b"BAD"
                        writer.write(tag + b" " + code + b" failed\r\n")
                elif command == b"LOGIN":
                    writer.write(tag + b" OK logged in\r\n")
                elif command == b"LIST":
                    writer.write(
                        b'* LIST (\\HasNoChildren) "." INBOX\r\n'
                        b'* LIST (\\HasNoChildren \\Sent) "." "Sent Items"\r\n'
                        + tag
                        + b" OK done\r\n"
                    )
                elif command == b"APPEND":
                    if self.mode == "hangup":
                        writer.close()
                        return
                    size = int(raw.rstrip(b"\r\n").rsplit(b"{", 1)[1].rstrip(b"}"))
                    writer.write(b"+ OK\r\n")
                    self.received.append(await reader.readexactly(size + 2))
                    writer.write(tag + b" OK [APPENDUID 7 1] appended\r\n")
                elif command == b"LOGOUT":
                    writer.write(b"* BYE\r\n" + tag + b" OK bye\r\n")
                    await writer.drain()
                    writer.close()
                    return
                else:
                    writer.write(tag + b" BAD unexpected\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return


Scripted = Callable[[str], Awaitable[ScriptedImap]]


@pytest.fixture
async def scripted() -> AsyncIterator[Scripted]:
    servers: list[asyncio.Server] = []

    async def make(mode: str) -> ScriptedImap:
        script = ScriptedImap(mode)
        server = await asyncio.start_server(script.handle, "127.0.0.1", 0)
        script.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return script

    yield make
    for server in servers:
        server.close()


def imap_account(port: int, **changes: Any) -> AccountConfig:
    server = ImapServer("127.0.0.1", port, TlsMode.NONE, None, None, None, None)
    base = make_account("ops@host.example", password="pw")
    return dataclasses.replace(base, imap=dataclasses.replace(server, **changes))


def oauth_account(port: int) -> AccountConfig:
    return dataclasses.replace(
        imap_account(port), password=None, oauth=OAuthConfig(flow="refresh_token")
    )


def token_source(token: str) -> Callable[[AccountConfig], Awaitable[str]]:
    async def source(account: AccountConfig) -> str:
        assert account.address == "ops@host.example"
        return token

    return source


async def test_xoauth2_response_goes_on_its_own_line(scripted: Scripted) -> None:
    server = await scripted("ok")
    session = ImapSession(oauth_account(server.port), token_source=token_source(GOOD_TOKEN))
    await session.open()
    assert session.is_open
    auth = next(i for i, ln in enumerate(server.received) if b"AUTHENTICATE" in ln)
    assert server.received[auth].endswith(b" AUTHENTICATE XOAUTH2\r\n")  # no initial response
    blob = server.received[auth + 1].rstrip(b"\r\n")
    assert base64.b64decode(blob) == (
        f"user=ops@host.example\x01auth=Bearer {GOOD_TOKEN}\x01\x01".encode()
    )
    await session.logout()


async def test_refused_token_is_answered_with_an_empty_line_and_reported(
    scripted: Scripted,
) -> None:
    server = await scripted("ok")
    session = ImapSession(oauth_account(server.port), token_source=token_source("at-revoked"))
    with pytest.raises(ImapError) as caught:
        await session.open()
    # Refused, not "timed out": a bad token must not look like a server that is down.
    assert caught.value.kind is ImapFailure.LOGIN_REFUSED
    assert "AUTHENTICATIONFAILED" in caught.value.detail
    assert server.received[-1] == b"\r\n"
    assert not session.is_open


async def test_no_token_source_is_its_own_failure(scripted: Scripted) -> None:
    server = await scripted("ok")
    with pytest.raises(ImapError) as caught:
        await ImapSession(oauth_account(server.port)).open()
    assert caught.value.kind is ImapFailure.NO_TOKEN


async def test_login_quotes_and_non_ascii_password_uses_plain(scripted: Scripted) -> None:
    server = await scripted("ok")
    session = ImapSession(imap_account(server.port, username='odd"user'))
    await session.open()
    assert any(b' LOGIN "odd\\"user" "pw"' in ln for ln in server.received)
    await session.logout()
    utf8 = dataclasses.replace(imap_account(server.port), password=Secret("pässwort", "literal"))
    session = ImapSession(utf8)
    await session.open()
    auth = next(i for i, ln in enumerate(server.received) if ln.endswith(b"AUTHENTICATE PLAIN\r\n"))
    assert base64.b64decode(server.received[auth + 1]) == (
        b"\0ops@host.example\0" + "pässwort".encode()
    )
    await session.logout()


async def test_sent_folder_and_append_arguments(scripted: Scripted) -> None:
    server = await scripted("ok")
    session = ImapSession(imap_account(server.port))
    await session.open()
    folder = await session.find_sent_folder()
    assert folder == '"Sent Items"'
    assert any(ln.endswith(b' LIST "" "*" RETURN (SPECIAL-USE)\r\n') for ln in server.received)
    content = b"Message-ID: <m@x>\r\n\r\nbody\r\n"
    reply = await session.append(folder, content, when=1_700_000_000.0)
    assert "APPENDUID" in reply
    append = next(ln for ln in server.received if b" APPEND " in ln)
    assert append.endswith(
        b' APPEND "Sent Items" (\\Seen) "14-Nov-2023 22:13:20 +0000" {%d}\r\n' % len(content)
    )
    assert server.received[-1] == content + b"\r\n"
    await session.append('"INBOX"', content, when=0, seen=False)  # a DSN: left unread
    append = [ln for ln in server.received if b" APPEND " in ln][-1]
    assert append.endswith(
        b' APPEND "INBOX" () "01-Jan-1970 00:00:00 +0000" {%d}\r\n' % len(content)
    )
    await session.logout()


async def test_a_stalled_server_ends_the_call_and_the_session(scripted: Scripted) -> None:
    server = await scripted("stall")
    session = ImapSession(
        imap_account(server.port), timeouts=ImapTimeouts(connect=5, command=0.2, append=5)
    )
    await session.open()
    with pytest.raises(ImapError) as caught:
        await session.find_sent_folder()
    assert caught.value.kind is ImapFailure.TIMEOUT
    assert not session.is_open  # never reused: aioimaplib would wait for the lost reply


async def test_a_connection_lost_during_append_is_ambiguous(scripted: Scripted) -> None:
    server = await scripted("hangup")
    session = ImapSession(
        imap_account(server.port), timeouts=ImapTimeouts(connect=5, command=60, append=3600)
    )
    await session.open()
    with pytest.raises(ImapError) as caught:
        await session.append('"Sent"', b"Message-ID: <a@b>\r\n\r\nx\r\n", when=0)
    # Ends when the connection drops, not after the hour-long timeout.
    assert caught.value.kind is ImapFailure.NETWORK
    assert caught.value.ambiguous


async def test_nobody_listening_is_a_network_failure() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ImapError) as caught:
        await ImapSession(imap_account(port)).open()
    assert caught.value.kind is ImapFailure.NETWORK


async def test_starttls_is_required_when_configured(scripted: Scripted) -> None:
    server = await scripted("ok")  # offers no STARTTLS
    account = imap_account(server.port, tls=TlsMode.STARTTLS)
    with pytest.raises(ImapError) as caught:
        await ImapSession(account).open()
    assert caught.value.kind is ImapFailure.TLS
    assert not any(b"LOGIN" in ln or b"AUTHENTICATE" in ln for ln in server.received)
