"""Account pauses shared by the fleet: a pause on one host holds the mail on every host.

One row per account: paused or not, why, by which host, and a version from one sequence, so
each host reads only what changed since it last looked. A host tells the fleet when an
account's pause begins or ends (``publish``); the change is written only if it is one
(``paused`` differs), which makes the first host to pause an account the one whose alert
goes out: ``publish`` says whether this host's write began the incident.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from relayd.fleet.database import FleetDatabase

__all__ = ["FleetHealth", "SharedPause"]


@dataclass(frozen=True)
class SharedPause:
    account: str
    paused: bool
    reason: str
    host: str
    version: int


class FleetHealth:
    def __init__(self, db: FleetDatabase, *, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        self._seen_version = 0

    async def publish(self, account: str, paused: bool, reason: str) -> bool:
        """Record the account's pause (or its end); True if this changed the fleet's state.
        FleetUnavailable if the database cannot be reached."""
        async with self.db.connection() as conn:
            cur = await conn.execute(
                "INSERT INTO fleet_health"
                " (account, paused, reason, host, incident, version, changed_at)"
                " VALUES (%s, %s, %s, %s, %s, nextval('fleet_health_version'), %s)"
                " ON CONFLICT (account) DO UPDATE SET paused = excluded.paused,"
                " reason = excluded.reason, host = excluded.host,"
                " incident = fleet_health.incident + excluded.incident,"
                " version = excluded.version, changed_at = excluded.changed_at"
                " WHERE fleet_health.paused IS DISTINCT FROM excluded.paused"
                " RETURNING version",
                (account, paused, reason[:500], self.db.name, int(paused), self.clock()),
            )
            return await cur.fetchone() is not None

    async def changes(self) -> list[SharedPause]:
        """What changed since the last call (everything, the first time)."""
        async with self.db.connection() as conn:
            cur = await conn.execute(
                "SELECT account, paused, reason, host, version FROM fleet_health"
                " WHERE version > %s ORDER BY version",
                (self._seen_version,),
            )
            rows = await cur.fetchall()
        found = [SharedPause(str(a), bool(p), str(r), str(h), int(v)) for a, p, r, h, v in rows]
        if found:
            self._seen_version = found[-1].version
        return found

    async def paused_accounts(self) -> dict[str, SharedPause]:
        async with self.db.connection() as conn:
            cur = await conn.execute(
                "SELECT account, paused, reason, host, version FROM fleet_health WHERE paused"
            )
            rows = await cur.fetchall()
        return {
            str(a): SharedPause(str(a), bool(p), str(r), str(h), int(v)) for a, p, r, h, v in rows
        }
