"""IMAP sessions per account: one login reused across filings, closed when idle.

A login per copy would be slow and, at Gmail or Microsoft, soon throttled; so the session of
an account stays open between filings and is logged out after ``idle_seconds`` without use.
The Sent folder an account's server flags ``\\Sent`` is looked up once and remembered (a
LIST per message would be a round trip for nothing); the memory is keyed by the account's
IMAP settings, so a reload that changes them starts afresh.

Callers use one session of an account at a time (the filing stage runs one worker per
account); this module does not lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass

from relayd.config.model import AccountConfig
from relayd.core.sentcopy import Folder
from relayd.sync import wire
from relayd.sync.imap import (
    DEFAULT_TIMEOUTS,
    ImapSession,
    ImapTimeouts,
    PasswordSource,
    TokenSource,
)
from relayd.tasks import TaskSet

__all__ = ["ImapConnections"]

log = logging.getLogger(__name__)

INBOX = '"INBOX"'  # RFC 3501 §5.1: the name INBOX is case-insensitive and always exists


def settings_key(account: AccountConfig) -> str:
    """Changes when anything that shapes the IMAP session changes; reveals no secret."""
    h = hashlib.sha256(b"relayd-imap\0")
    imap = account.imap
    assert imap is not None
    parts = [
        account.address,
        account.username,
        imap.host,
        str(imap.port),
        imap.tls.value,
        str(imap.ca_file),
        imap.username or "",
        imap.password.reveal() if imap.password else "",
        account.password.reveal() if account.password else "",
        repr(account.oauth),
    ]
    for part in parts:
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:24]


@dataclass
class _Idle:
    key: str
    session: ImapSession
    timer: asyncio.TimerHandle


class ImapConnections:
    def __init__(
        self,
        *,
        token_source: TokenSource | None = None,
        password_source: PasswordSource | None = None,
        timeouts: ImapTimeouts = DEFAULT_TIMEOUTS,
        idle_seconds: float = 30.0,
    ) -> None:
        self.token_source = token_source
        self.password_source = password_source
        self.timeouts = timeouts
        self.idle_seconds = idle_seconds
        self.logins: Counter[str] = Counter()
        self._idle: dict[str, _Idle] = {}
        self._folders: dict[str, str] = {}  # settings key -> Sent folder argument
        self._closing = TaskSet()

    async def acquire(self, account: AccountConfig) -> ImapSession:
        """The account's open session, or a new one (connect, TLS, login)."""
        key = settings_key(account)
        idle = self._idle.pop(account.address, None)
        if idle is not None:
            idle.timer.cancel()
            if idle.key == key and idle.session.is_open:
                return idle.session
            self._logout_later(idle.session)
        session = ImapSession(
            account,
            token_source=self.token_source,
            password_source=self.password_source,
            timeouts=self.timeouts,
        )
        await session.open()
        self.logins[account.address] += 1
        log.debug(
            "IMAP login %d to %s",
            self.logins[account.address],
            session.where,
            extra={"account": account.address},
        )
        return session

    def release(self, account: AccountConfig, session: ImapSession) -> None:
        """Keep the session for the account's next filing; log it out when left idle."""
        if not session.is_open:
            return
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.idle_seconds, self._expire, account.address, session)
        self._idle[account.address] = _Idle(settings_key(account), session, timer)

    def _expire(self, address: str, session: ImapSession) -> None:
        idle = self._idle.get(address)
        if idle is not None and idle.session is session:
            del self._idle[address]
            self._logout_later(session)

    def _logout_later(self, session: ImapSession) -> None:
        self._closing.spawn(session.logout())

    async def folder(self, account: AccountConfig, session: ImapSession, folder: Folder) -> str:
        """The mailbox argument to file into: INBOX, ``imap.sent_folder`` when set (it wins),
        else the folder flagged ``\\Sent`` (RFC 6154), looked up once per account."""
        if folder is Folder.INBOX:
            return INBOX
        assert account.imap is not None
        if account.imap.sent_folder:
            return wire.mailbox_argument(account.imap.sent_folder)
        key = settings_key(account)
        found = self._folders.get(key)
        if found is None:
            found = await session.find_sent_folder()
            self._folders[key] = found
            log.info("Sent folder is %s", found, extra={"account": account.address})
        return found

    def forget_folder(self, account: AccountConfig) -> None:
        """The remembered folder was refused (renamed, deleted): look it up again next time."""
        if account.imap is not None:
            self._folders.pop(settings_key(account), None)

    async def close_all(self, timeout: float = 10.0) -> None:
        for idle in self._idle.values():
            idle.timer.cancel()
            self._logout_later(idle.session)
        self._idle.clear()
        with contextlib.suppress(Exception):
            await self._closing.drain(timeout, cancel_late=True, unwind=0.2)
