"""Which hosts the fleet has, and how much mail each holds per account.

Each host writes a heartbeat row (the database's clock) and its per-account queue counts
every few seconds. ``hosts_seen`` — the hosts heard from within ``HOST_ALIVE_SECONDS`` — is
what a budget is split by while the database is unreachable, so the last count is kept in
the state directory: a host that starts during an outage still knows how many share.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from psycopg import AsyncConnection

from relayd.fleet.database import FleetDatabase

__all__ = ["HOST_ALIVE_SECONDS", "FleetHosts", "HostQueue", "host_queues", "hosts_alive"]

log = logging.getLogger(__name__)

# A host not heard from this long no longer counts among those sharing a budget.
HOST_ALIVE_SECONDS = 120.0

_DB_NOW = "extract(epoch from clock_timestamp())"


@dataclass(frozen=True)
class HostQueue:
    host: str
    account: str
    queued: int
    held: int
    updated_at: float
    alive: bool


class FleetHosts:
    def __init__(self, db: FleetDatabase, state_directory: Path) -> None:
        self.db = db
        self.path = state_directory / "fleet-hosts.json"
        self._seen = self._load()

    def _load(self) -> int:
        try:
            return max(1, int(json.loads(self.path.read_text())["hosts_seen"]))
        except (OSError, ValueError, KeyError, TypeError):
            return 1

    def hosts_seen(self) -> int:
        return self._seen

    async def beat(self, queues: dict[str, tuple[int, int]], started_at: float) -> None:
        """Say this host is alive, with its queue per account; learn how many hosts are."""
        name = self.db.name
        async with self.db.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO fleet_hosts (name, seen_at, started_at)"
                f" VALUES (%s, {_DB_NOW}, %s) ON CONFLICT (name) DO UPDATE"
                f" SET seen_at = {_DB_NOW}, started_at = excluded.started_at",
                (name, started_at),
            )
            await conn.execute("DELETE FROM fleet_queues WHERE host = %s", (name,))
            if queues:
                async with conn.cursor() as cur:
                    await cur.executemany(
                        "INSERT INTO fleet_queues (host, account, queued, held, updated_at)"
                        f" VALUES (%s, %s, %s, %s, {_DB_NOW})",
                        [(name, a, q, h) for a, (q, h) in sorted(queues.items())],
                    )
            cur = await conn.execute(
                f"SELECT count(*) FROM fleet_hosts WHERE seen_at > {_DB_NOW} - %s",
                (HOST_ALIVE_SECONDS,),
            )
            row = await cur.fetchone()
        seen = max(1, int(row[0])) if row is not None else 1
        if seen != self._seen:
            log.info("fleet: %d hosts share the budgets", seen)
            self._seen = seen
            self._save(seen)

    def _save(self, seen: int) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, json.dumps({"hosts_seen": seen}).encode())
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
        except OSError as exc:
            log.warning("cannot keep the fleet's host count in %s: %s", self.path, exc)


async def host_queues(conn: AsyncConnection) -> list[HostQueue]:
    """Every host's queue per account (``relayd status``)."""
    cur = await conn.execute(
        "SELECT q.host, q.account, q.queued, q.held, q.updated_at,"
        f" coalesce(h.seen_at > {_DB_NOW} - %s, false)"
        " FROM fleet_queues q LEFT JOIN fleet_hosts h ON h.name = q.host"
        " ORDER BY q.account, q.host",
        (HOST_ALIVE_SECONDS,),
    )
    rows = await cur.fetchall()
    return [
        HostQueue(str(h), str(a), int(q), int(hd), float(u), bool(alive))
        for h, a, q, hd, u, alive in rows
    ]


async def hosts_alive(conn: AsyncConnection) -> list[str]:
    cur = await conn.execute(
        f"SELECT name FROM fleet_hosts WHERE seen_at > {_DB_NOW} - %s ORDER BY name",
        (HOST_ALIVE_SECONDS,),
    )
    return [str(r[0]) for r in await cur.fetchall()]
