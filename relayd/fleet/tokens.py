"""The fleet's token rows: one sealed record per account, one refresh at a time fleet-wide.

The row holds the same AES-GCM sealed record as the token file (``relayd.oauth.store``), so
the database never sees a token in clear and a host without ``tokens.key`` cannot use a
stolen row. ``locked(address)`` opens a transaction holding the account's advisory lock:
whoever refreshes does it inside, and writes the rotated refresh token in the same
transaction; the others wait for the lock and then find the new token in the row.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import psycopg
from psycopg import AsyncConnection

from relayd.config.model import FleetConfig
from relayd.fleet.database import FleetDatabase, FleetUnavailable, connect_once

__all__ = [
    "REVOKED",
    "TOKEN_LOCK",
    "FleetTokens",
    "TokenRow",
    "delete_row",
    "publish_consent",
    "put_row",
    "withdraw_consent",
]

# A revoked account's row: kept (not deleted) so that no host brings its own copy back.
REVOKED = b""

# pg_advisory_xact_lock(TOKEN_LOCK, hashtext(address)): the refresh lock of one account.
TOKEN_LOCK = 0x746F6B  # "tok"
LOCK_POLL_SECONDS = 0.1


@dataclass
class TokenRow:
    """The account's row as read under its lock; ``write`` replaces it in the transaction."""

    conn: AsyncConnection
    address: str
    sealed: bytes | None  # REVOKED: `relayd auth --revoke` on some host
    host: str
    updated_at: float = 0.0

    async def write(self, sealed: bytes, consent_id: str, updated_at: float) -> None:
        await put_row(self.conn, self.address, sealed, consent_id, updated_at, self.host)
        self.sealed = sealed


async def put_row(
    conn: AsyncConnection,
    address: str,
    sealed: bytes,
    consent_id: str,
    updated_at: float,
    host: str,
) -> None:
    await conn.execute(
        "INSERT INTO fleet_tokens (address, sealed, consent_id, updated_at, written_by)"
        " VALUES (%s, %s, %s, %s, %s)"
        " ON CONFLICT (address) DO UPDATE SET sealed = excluded.sealed,"
        " consent_id = excluded.consent_id, updated_at = excluded.updated_at,"
        " written_by = excluded.written_by",
        (address.lower(), sealed, consent_id, updated_at, host),
    )


async def delete_row(conn: AsyncConnection, address: str, host: str) -> None:
    """The tokens are gone for the fleet: the row becomes a tombstone (REVOKED), which every
    host's copy yields to — a host's copy must not become the fleet's record again."""
    await put_row(conn, address, REVOKED, "revoked", time.time(), host)


async def lock_account(conn: AsyncConnection, address: str) -> None:
    """Wait for the account's refresh lock (in the open transaction). Polled rather than
    blocking, so that a wait never outlasts the database going away unnoticed."""
    while True:
        cur = await conn.execute(
            "SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))", (TOKEN_LOCK, address.lower())
        )
        row = await cur.fetchone()
        if row is not None and row[0]:
            return
        await asyncio.sleep(LOCK_POLL_SECONDS)


class FleetTokens:
    def __init__(self, db: FleetDatabase) -> None:
        self.db = db

    @property
    def available(self) -> bool:
        return self.db.online

    @contextlib.asynccontextmanager
    async def locked(self, address: str) -> AsyncIterator[TokenRow]:
        """The account's row under its fleet-wide refresh lock, in a transaction that
        commits when the block ends (rolls back if it raises). FleetUnavailable if the
        database cannot be reached."""
        async with self.db.connection() as conn, conn.transaction():
            await lock_account(conn, address)
            cur = await conn.execute(
                "SELECT sealed, updated_at FROM fleet_tokens WHERE address = %s",
                (address.lower(),),
            )
            row = await cur.fetchone()
            if row is None:
                yield TokenRow(conn, address, None, self.db.name)
            else:
                yield TokenRow(conn, address, bytes(row[0]), self.db.name, float(row[1]))

    async def read(self, address: str) -> bytes | None:
        async with self.db.connection() as conn:
            cur = await conn.execute(
                "SELECT sealed FROM fleet_tokens WHERE address = %s", (address.lower(),)
            )
            row = await cur.fetchone()
            return bytes(row[0]) if row else None

    async def consent_ids(self) -> dict[str, str]:
        """Every account's consent id: a new consent on any host resumes it on this one."""
        async with self.db.connection() as conn:
            cur = await conn.execute("SELECT address, consent_id FROM fleet_tokens")
            return {str(a): str(c) for a, c in await cur.fetchall()}


async def _with_connection_put(
    fleet: FleetConfig, address: str, sealed: bytes, consent_id: str, updated_at: float
) -> None:
    conn = await connect_once(fleet)
    try:
        async with conn.transaction():
            await lock_account(conn, address)
            await put_row(conn, address, sealed, consent_id, updated_at, fleet.name)
    finally:
        await conn.close()


async def _with_connection_delete(fleet: FleetConfig, address: str) -> None:
    conn = await connect_once(fleet)
    try:
        async with conn.transaction():
            await lock_account(conn, address)
            await delete_row(conn, address, fleet.name)
    finally:
        await conn.close()


def publish_consent(
    fleet: FleetConfig, address: str, sealed: bytes, consent_id: str, updated_at: float
) -> str | None:
    """``relayd auth`` on any host: the new consent goes to the fleet's row at once. None,
    or why it could not (the daemon then uploads this host's newer copy later)."""
    try:
        asyncio.run(_with_connection_put(fleet, address, sealed, consent_id, updated_at))
    except (FleetUnavailable, psycopg.Error, OSError) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def withdraw_consent(fleet: FleetConfig, address: str) -> str | None:
    """``relayd auth --revoke``: the fleet's row is deleted too. None, or why not."""
    try:
        asyncio.run(_with_connection_delete(fleet, address))
    except (FleetUnavailable, psycopg.Error, OSError) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None
