"""Peers that stall at the worst moment, for the test world's shutdown tests.

- ``HoldingUpstream``: an SMTP server that takes a message marked ``hold-reply`` (hands it on
  to the real Dovecot over LMTP, as a real server that accepted it would) and then never
  answers the final dot, once; every other message goes through.
- ``StallingImapProxy``: a plain-text proxy in front of Dovecot's IMAP port that, once, stops
  passing anything on as soon as the client sends APPEND.

Each runs its own event loop in a thread.
"""

from __future__ import annotations

import asyncio
import smtplib
import threading
from collections.abc import Coroutine
from typing import Any

from aiosmtpd.smtp import SMTP as SMTPServer

__all__ = ["HoldingUpstream", "StallingImapProxy"]

HOST = "127.0.0.1"
HOLD_MARK = b"hold-reply"


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, work: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class _LongLines(SMTPServer):
    line_length_limit = 1 << 20  # relayd relays long lines as they are


class HoldingUpstream:
    def __init__(self, lmtp_port: int) -> None:
        self.lmtp_port = lmtp_port
        self.port = 0
        self.held = 0  # messages whose final dot got no answer
        self.passed = 0
        self._loop = _Loop()
        self._server: asyncio.Server | None = None

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        content: bytes = envelope.original_content
        await asyncio.to_thread(self._hand_on, envelope.mail_from, envelope.rcpt_tos, content)
        if HOLD_MARK in content and not self.held:
            self.held += 1
            await asyncio.Event().wait()  # taken, and the reply never comes
        self.passed += 1
        return "250 2.0.0 Ok: queued"

    def _hand_on(self, sender: str, recipients: list[str], content: bytes) -> None:
        with smtplib.LMTP(HOST, self.lmtp_port) as lmtp:
            lmtp.sendmail(sender, recipients, content)

    def start(self) -> None:
        def session() -> SMTPServer:
            return _LongLines(self, hostname="holding.test")

        async def serve() -> asyncio.Server:
            return await asyncio.get_running_loop().create_server(session, HOST, 0)

        self._server = self._loop.run(serve())
        self.port = int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()

        self._loop.run(close())
        self._loop.stop()


class StallingImapProxy:
    def __init__(self, imap_port: int) -> None:
        self.imap_port = imap_port
        self.port = 0
        self.stalled = 0  # APPENDs that went nowhere
        self._loop = _Loop()
        self._server: asyncio.Server | None = None

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, watch: bool
    ) -> None:
        try:
            while data := await reader.read(65536):
                if watch and b" APPEND " in data.upper() and not self.stalled:
                    self.stalled += 1
                    await asyncio.Event().wait()  # nothing more, either way
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(HOST, self.imap_port)
        await asyncio.gather(
            self._pipe(reader, up_writer, watch=True),
            self._pipe(up_reader, writer, watch=False),
        )

    def start(self) -> None:
        async def serve() -> asyncio.Server:
            return await asyncio.start_server(self._client, HOST, 0)

        self._server = self._loop.run(serve())
        self.port = int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()

        self._loop.run(close())
        self._loop.stop()
