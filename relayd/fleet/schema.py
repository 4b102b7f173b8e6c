"""The fleet database's schema, versioned: ``relayd fleet init`` creates or migrates it.

Each migration runs once, in order, in one transaction with the version bump, under an
advisory lock, so two hosts running ``fleet init`` together neither fail nor apply a step
twice. Times are epoch seconds (``double precision``): lease expiry uses the database's own
clock, so the hosts' clocks never decide who holds a lease.
"""

from __future__ import annotations

from psycopg import AsyncConnection

__all__ = ["LATEST", "MIGRATIONS", "migrate", "schema_version"]

# pg_advisory_xact_lock(INIT_LOCK): one migration at a time.
INIT_LOCK = 0x72656C61  # "rela"

MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE fleet_hosts (
            name text PRIMARY KEY,
            seen_at double precision NOT NULL,
            started_at double precision NOT NULL
        );
        CREATE TABLE fleet_tokens (
            address text PRIMARY KEY,
            sealed bytea NOT NULL,          -- AES-GCM under tokens.key, the address bound
            consent_id text NOT NULL,
            updated_at double precision NOT NULL,
            written_by text NOT NULL
        );
        CREATE TABLE fleet_leases (
            account text NOT NULL,
            slot integer NOT NULL,
            holder text,
            lease_id text,
            expires_at double precision NOT NULL DEFAULT 0,
            PRIMARY KEY (account, slot)
        );
        CREATE TABLE fleet_sends (
            account text NOT NULL,
            second bigint NOT NULL,         -- epoch second of the starts counted here
            starts integer NOT NULL,
            PRIMARY KEY (account, second)
        );
        -- One start of the account, if the window has room (and no back-off is on): one
        -- round trip, the account's lock held only inside. Mirrors
        -- relayd.core.budget.wait_in_buckets. Returns the wait (0: counted) and the window.
        CREATE FUNCTION fleet_take_start(
            p_account text, p_now double precision, p_limit integer, p_window double precision
        ) RETURNS TABLE (wait double precision, seconds bigint[], counts integer[])
        LANGUAGE plpgsql AS $$
        DECLARE
            v_until double precision;
            v_total integer;
            v_left integer;
            v_wait double precision := 0;
            r record;
        BEGIN
            PERFORM pg_advisory_xact_lock(6452580, hashtext(p_account));
            DELETE FROM fleet_sends
                WHERE account = p_account AND second < floor(p_now - p_window)::bigint - 1;
            SELECT paused_until INTO v_until FROM fleet_throttle WHERE account = p_account;
            IF v_until IS NOT NULL AND v_until > p_now THEN
                v_wait := v_until - p_now;
            ELSE
                SELECT coalesce(sum(starts), 0) INTO v_total FROM fleet_sends
                    WHERE account = p_account AND second + 1 > p_now - p_window;
                IF v_total >= p_limit THEN
                    v_left := v_total;
                    FOR r IN SELECT second, starts FROM fleet_sends
                        WHERE account = p_account AND second + 1 > p_now - p_window
                        ORDER BY second
                    LOOP
                        v_left := v_left - r.starts;
                        IF v_left < p_limit THEN
                            v_wait := greatest(0, r.second + 1 + p_window - p_now);
                            EXIT;
                        END IF;
                    END LOOP;
                ELSE
                    INSERT INTO fleet_sends (account, second, starts)
                        VALUES (p_account, floor(p_now)::bigint, 1)
                        ON CONFLICT (account, second)
                        DO UPDATE SET starts = fleet_sends.starts + 1;
                END IF;
            END IF;
            RETURN QUERY SELECT v_wait,
                array_agg(s.second ORDER BY s.second), array_agg(s.starts ORDER BY s.second)
                FROM fleet_sends s WHERE s.account = p_account;
        END $$;
        CREATE TABLE fleet_throttle (
            account text PRIMARY KEY,
            paused_until double precision NOT NULL
        );
        CREATE SEQUENCE fleet_health_version;
        CREATE TABLE fleet_health (
            account text PRIMARY KEY,
            paused boolean NOT NULL,
            reason text NOT NULL,
            host text NOT NULL,
            incident integer NOT NULL DEFAULT 0,
            version bigint NOT NULL,
            changed_at double precision NOT NULL
        );
        CREATE TABLE fleet_queues (
            host text NOT NULL,
            account text NOT NULL,
            queued integer NOT NULL,
            held integer NOT NULL,
            updated_at double precision NOT NULL,
            PRIMARY KEY (host, account)
        );
        """,
    ),
)
LATEST = MIGRATIONS[-1][0]


async def schema_version(conn: AsyncConnection) -> int:
    """0: no relayd schema in this database yet."""
    cur = await conn.execute("SELECT to_regclass('relayd_schema') IS NOT NULL")
    row = await cur.fetchone()
    if row is None or not row[0]:
        return 0
    cur = await conn.execute("SELECT max(version) FROM relayd_schema")
    row = await cur.fetchone()
    return int(row[0]) if row is not None and row[0] is not None else 0


async def migrate(conn: AsyncConnection) -> tuple[int, int]:
    """Bring the schema to ``LATEST``: (version before, version after)."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (INIT_LOCK,))
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS relayd_schema ("
            " version integer PRIMARY KEY,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        before = await schema_version(conn)
        if before > LATEST:
            raise RuntimeError(
                f"the fleet schema is version {before}, newer than this relayd knows "
                f"({LATEST}): upgrade relayd on this host"
            )
        for version, sql in MIGRATIONS:
            if version <= before:
                continue
            await conn.execute(sql.encode())
            await conn.execute("INSERT INTO relayd_schema (version) VALUES (%s)", (version,))
    return before, LATEST
