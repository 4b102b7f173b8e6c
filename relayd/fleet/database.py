"""The connection to the fleet database, and whether it is reachable right now.

Every fleet operation goes through ``FleetDatabase.connection``: a pooled psycopg
connection, with a short timeout. Any trouble reaching the database (down, restarting,
unreachable, too slow) becomes ``FleetUnavailable``, marks the database offline, and the
caller goes on with what it has locally: cached tokens, a share of each budget. The
heartbeat (``relayd.fleet.hosts``) brings it back online. Nothing here logs the URL: its
password is given to the log redactor as well as the whole URL.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import psycopg
from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from relayd.config.model import FleetConfig
from relayd.fleet.errors import FleetUnavailable
from relayd.fleet.schema import LATEST, schema_version
from relayd.log import redactor

__all__ = ["CONNECT_TIMEOUT", "FleetDatabase", "FleetUnavailable", "connect_once"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 3.0  # seconds, for a connection and for one operation's wait for it
POOL_SIZE = 8


def database_password(url: str) -> str | None:
    if "://" in url:
        return urlsplit(url).password
    for part in url.split():
        if part.startswith("password="):
            return part.split("=", 1)[1]
    return None


def _conninfo(fleet: FleetConfig) -> str:
    url = fleet.database.reveal()
    password = database_password(url)
    if password:
        redactor.add_secret(password)
    return url


async def connect_once(fleet: FleetConfig) -> AsyncConnection:
    """One connection outside the pool (``relayd fleet init``, ``relayd auth``, status)."""
    try:
        return await AsyncConnection.connect(
            _conninfo(fleet),
            autocommit=True,
            connect_timeout=int(CONNECT_TIMEOUT),
            application_name=f"relayd {fleet.name}",
        )
    except psycopg.Error as exc:
        raise FleetUnavailable(_describe(exc)) from None


def _describe(exc: BaseException) -> str:
    # psycopg's messages name host and user, never the password (and the log's redactor
    # knows the password all the same).
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class FleetDatabase:
    def __init__(self, fleet: FleetConfig) -> None:
        self.fleet = fleet
        self.name = fleet.name
        self.online = False
        self.schema_ok = False
        self.offline_since: float | None = time.time()
        self.online_since: float | None = None
        self._pool: AsyncConnectionPool[AsyncConnection] | None = None
        self._last_problem = ""

    async def open(self) -> None:
        """Start the pool without waiting for the database (it may be down at start)."""
        self._pool = AsyncConnectionPool(
            _conninfo(self.fleet),
            min_size=1,
            max_size=POOL_SIZE,
            open=False,
            timeout=CONNECT_TIMEOUT,
            # No check at checkout (a round trip per use): a connection the server dropped
            # fails its next use, which marks the database offline and goes back broken,
            # and the pool replaces it.
            reconnect_timeout=3600.0 * 24 * 365,
            kwargs={
                "autocommit": True,
                "connect_timeout": int(CONNECT_TIMEOUT),
                "application_name": f"relayd {self.fleet.name}",
            },
        )
        await self._pool.open(wait=False)

    async def close(self) -> None:
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await self._pool.close(timeout=2.0)
            self._pool = None

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        """A connection; FleetUnavailable if the database cannot be reached or fails. Errors
        of the caller's own (not the database's) pass through unchanged."""
        if self._pool is None:
            raise FleetUnavailable("the fleet database is not open")
        try:
            async with self._pool.connection(timeout=CONNECT_TIMEOUT) as conn:
                yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout, OSError) as exc:
            self.went_offline(_describe(exc))
            raise FleetUnavailable(_describe(exc)) from None
        except psycopg.Error as exc:
            # A statement the database refused (a schema that is not ours, a lock timeout):
            # not a reason to stop delivering either.
            log.error("fleet database error: %s", _describe(exc))
            raise FleetUnavailable(_describe(exc)) from None

    async def check(self) -> bool:
        """Reachable, and with the schema this relayd knows; updates ``online``."""
        try:
            async with self.connection() as conn:
                version = await schema_version(conn)
        except FleetUnavailable:
            return False
        if version != LATEST:
            if self.schema_ok or self._last_problem != "schema":
                log.error(
                    "fleet database schema is version %d, this relayd needs %d: run "
                    "`relayd fleet init`; delivering on local shares until then",
                    version,
                    LATEST,
                )
            self._last_problem = "schema"
            self.schema_ok = False
            self.online = False
            return False
        self.schema_ok = True
        if not self.online:
            self.online = True
            if self.offline_since is not None:
                log.info(
                    "fleet database reachable: shared tokens, health and budgets in use (host %s)",
                    self.name,
                )
            self.offline_since = None
            self.online_since = time.time()
            self._last_problem = ""
        return True

    def went_offline(self, why: str) -> None:
        if self.online or self._last_problem != why:
            log.warning(
                "fleet database unreachable (%s): delivering with cached tokens and a local "
                "share of each budget",
                why,
            )
        self._last_problem = why
        if self.online:
            self.offline_since = time.time()
        self.online = False
