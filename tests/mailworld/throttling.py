"""An upstream that limits concurrent sessions the way Microsoft 365 does, for the test world.

Exchange Online allows 3 concurrent SMTP sessions per mailbox and answers
``432 4.3.2 STOREDRV.ClientSubmit; sender thread limit exceeded`` (or "Concurrent connections
limit exceeded") beyond that; Postfix cannot be made to say 432. This server says it at MAIL
FROM on every session opened while ``max_sessions`` others were open, and hands every message it
accepts on to the real Dovecot over LMTP, so a test sees the mail arrive in the mailbox.

Runs on its own event loop in a thread; counts sessions, the most working at once, the 432s,
and, after the first 432, the most sessions relayd wanted at once (those working and the one
it opened).
"""

from __future__ import annotations

import asyncio
import smtplib
import threading
import time
from typing import Any

from aiosmtpd.smtp import SMTP as SMTPServer

__all__ = ["SessionLimitedUpstream"]

HOST = "127.0.0.1"
REFUSAL = "432 4.3.2 Concurrent connections limit exceeded"


class _Session(SMTPServer):
    # Exchange takes long lines (relayd relays them as they are); aiosmtpd's 1001 does not.
    line_length_limit = 1 << 20

    def __init__(self, upstream: SessionLimitedUpstream) -> None:
        super().__init__(upstream, hostname="limited.test")
        self.upstream = upstream
        self.admitted = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A session opened while the limit's worth were working already is refused throughout.
        self.admitted = self.upstream.opened()
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.upstream.closed(self.admitted)
        super().connection_lost(exc)


class SessionLimitedUpstream:
    def __init__(self, lmtp_port: int, *, max_sessions: int = 2, data_delay: float = 0.0) -> None:
        self.lmtp_port = lmtp_port
        self.max_sessions = max_sessions
        # Seconds each DATA takes: slow enough that sessions overlap and leases are held.
        self.data_delay = data_delay
        self.arrivals: list[float] = []  # time.time() of each message taken
        self.port = 0
        self.open = 0
        self.most_open = 0
        self.most_open_after_refusal = 0
        self.refusals = 0
        self.delivered = 0
        self.sessions = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    # -- counting (from the server's loop) ---------------------------------------------------

    def opened(self) -> bool:
        """A new session; True if admitted. Only admitted sessions count against the limit
        (a refused one is on its way out), so ``most_open_after_refusal`` is how many
        sessions relayd wanted at once once it had been told: the working ones and this."""
        with self._lock:
            self.sessions += 1
            if self.refusals:
                self.most_open_after_refusal = max(self.most_open_after_refusal, self.open + 1)
            if self.open >= self.max_sessions:
                return False
            self.open += 1
            self.most_open = max(self.most_open, self.open)
            return True

    def closed(self, admitted: bool) -> None:
        if admitted:
            with self._lock:
                self.open -= 1

    # -- aiosmtpd hooks ----------------------------------------------------------------------

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if not server.admitted:
            with self._lock:
                self.refusals += 1
            return REFUSAL
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Sender OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self._lock:
            self.arrivals.append(time.time())
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        await asyncio.to_thread(
            self._hand_on, envelope.mail_from, envelope.rcpt_tos, envelope.original_content
        )
        with self._lock:
            self.delivered += 1
        return "250 2.6.0 Queued mail for delivery"

    def _hand_on(self, sender: str, recipients: list[str], content: bytes) -> None:
        with smtplib.LMTP(HOST, self.lmtp_port) as lmtp:
            lmtp.sendmail(sender, recipients, content)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

        async def serve() -> asyncio.Server:
            return await self._loop.create_server(lambda: _Session(self), HOST, 0)

        self._server = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        self.port = int(self._server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
                await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
