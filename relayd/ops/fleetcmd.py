"""``relayd fleet init`` (create or migrate the fleet schema) and the fleet part of
``relayd status`` (every host's queue per account, pauses shared by the fleet)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from relayd.config import load_for_command
from relayd.config.model import FleetConfig

__all__ = ["add_fleet_arguments", "cmd_fleet", "fleet_status"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def add_fleet_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=["init"],
        help="init: create the fleet schema in the database, or migrate it to this version",
    )


async def _init(fleet: FleetConfig) -> tuple[int, int]:
    from relayd.fleet.database import connect_once
    from relayd.fleet.schema import migrate

    conn = await connect_once(fleet)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


def cmd_fleet(args: argparse.Namespace) -> int:
    config = load_for_command(getattr(args, "config", None))
    if config is None:
        return EXIT_USAGE
    if config.fleet is None:
        print("error: no fleet: section in the configuration", file=sys.stderr)
        return EXIT_USAGE
    from relayd.fleet.errors import FleetUnavailable

    try:
        before, after = asyncio.run(_init(config.fleet))
    except (FleetUnavailable, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # the database refused a statement: say which, not a traceback
        print(f"error: the fleet schema could not be created: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if before == after:
        print(f"fleet schema is at version {after}: nothing to do")
    elif before == 0:
        print(f"fleet schema created (version {after})")
    else:
        print(f"fleet schema migrated from version {before} to {after}")
    return EXIT_OK


async def _status(fleet: FleetConfig) -> dict[str, Any]:
    from relayd.fleet.database import connect_once
    from relayd.fleet.hosts import host_queues, hosts_alive

    conn = await connect_once(fleet)
    try:
        queues = await host_queues(conn)
        alive = await hosts_alive(conn)
        cur = await conn.execute(
            "SELECT account, host, reason FROM fleet_health WHERE paused ORDER BY account"
        )
        rows = await cur.fetchall()
        paused = [{"account": str(a), "host": str(h), "reason": str(r)} for a, h, r in rows]
    finally:
        await conn.close()
    return {
        "host": fleet.name,
        "reachable": True,
        "hosts_alive": alive,
        "queues": [
            {
                "account": q.account,
                "host": q.host,
                "queued": q.queued,
                "held": q.held,
                "alive": q.alive,
            }
            for q in queues
        ],
        "paused": paused,
    }


def fleet_status(fleet: FleetConfig) -> dict[str, Any]:
    """What the fleet database says, or why it could not be asked."""
    from relayd.fleet.errors import FleetUnavailable

    try:
        return asyncio.run(asyncio.wait_for(_status(fleet), 10.0))
    except (FleetUnavailable, TimeoutError, OSError) as exc:
        return {"host": fleet.name, "reachable": False, "error": str(exc) or "timed out"}
    except Exception as exc:  # no schema yet, say
        return {"host": fleet.name, "reachable": False, "error": str(exc).splitlines()[0]}
