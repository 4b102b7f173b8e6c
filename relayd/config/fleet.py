"""``fleet:`` → FleetConfig (SPEC "Fleet"): many hosts sharing tokens, health and budgets.

The database is a secret value (its URL carries the password). Every host of a fleet must
open the others' token rows, so fleet mode needs ``tokens.key`` set to the same key
everywhere: a generated per-host key file would make each host's rows unreadable to the rest.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from relayd.config.model import FleetConfig, Secret
from relayd.config.secrets import read_secret
from relayd.config.yamlnodes import Item, NodeReader

__all__ = ["DEFAULT_LEASE_TIME", "FLEET_KEYS", "read_fleet"]

FLEET_KEYS = ("database", "name", "lease_time")
# How long a connection lease outlives its holder's last renewal: a host killed with its
# leases gives them back after this long. Renewed every third of it.
DEFAULT_LEASE_TIME = 30.0
MIN_LEASE_TIME = 3.0


def _host_name(text: str) -> str:
    if not text or len(text) > 64 or any(c.isspace() or ord(c) < 32 for c in text):
        raise ValueError("1-64 characters, no spaces")
    return text


def _database_problem(url: str) -> str | None:
    """What is wrong with the URL, without echoing it (it holds a password)."""
    if url.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(url)
        return None if parts.hostname or "host=" in parts.query else "the URL names no host"
    if "=" in url:  # a libpq keyword/value string: "host=... dbname=..."
        return None
    return "expected a PostgreSQL URL (postgresql://user:password@host:5432/dbname)"


def read_fleet(rd: NodeReader, item: Item, tokens_key: Item) -> FleetConfig | None:
    if not item.present:
        return None
    f = rd.mapping(item, FLEET_KEYS)
    rd.require(f["database"], "a secret value holding a PostgreSQL URL")
    database: Secret | None = read_secret(rd, f["database"])
    if database is not None:
        problem = _database_problem(database.reveal())
        if problem is not None:
            rd.error(f["database"].path, f["database"].line, f"{problem} ({database})")
            database = None
    name = rd.parsed(f["name"], _host_name, "a host name", trim=True) or socket.gethostname()
    lease = rd.duration(f["lease_time"])
    if lease is not None and lease < MIN_LEASE_TIME:
        rd.error(
            f["lease_time"].path,
            f["lease_time"].line,
            f"at least {MIN_LEASE_TIME:.0f}s: leases are renewed every third of it",
        )
        lease = None
    if not tokens_key.present:
        rd.error(
            item.path,
            item.line,
            "fleet mode needs tokens.key, the same secret on every host: each host opens the "
            "token rows the others wrote",
        )
    if database is None:
        return None
    return FleetConfig(
        database=database,
        name=name,
        lease_time=lease or DEFAULT_LEASE_TIME,
        where=item.where,
    )
