"""Fleet mode (SPEC "Fleet"): what many relayd hosts share through one PostgreSQL database.

Shared: the OAuth token rows (``tokens``), account pauses and their alerts (``health``), the
per-mailbox budgets — connection leases, the per-minute window, throttle back-off
(``budgets``) — and which hosts are alive with how much mail queued (``hosts``). Not shared:
the spool. Accepting mail never touches the database; delivery goes on without it.
"""
