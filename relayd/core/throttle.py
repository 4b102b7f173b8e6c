"""How an account's lane slows down when its provider says "too much": pure transitions.

Providers answer throttle replies (``relayd.core.outcome.is_throttle``) when an account sends
too fast or opens too many connections; Microsoft 365 allows 3 concurrent SMTP sessions per
mailbox, Gmail throttles logins and message rates. Retrying at once, on yet another
connection, only earns more refusals and can lock the mailbox. So a throttle reply slows the
whole lane: one connection fewer than were in use when it came, and no new attempt until a
pause has passed (doubling while the refusals go on, or what the provider asked for, such as
HTTP's ``Retry-After``). A calm spell gives the connections back one at a time.

No clock of its own and no I/O: the lane (``relayd.queue.lanes``) holds one ``Throttle`` and
asks it how long to wait and how many connections it may use.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

__all__ = ["FIRST_PAUSE", "MAX_PAUSE", "RECOVER_AFTER", "Throttle"]

FIRST_PAUSE = 5.0  # seconds; doubled for each throttle reply in a row
MAX_PAUSE = 300.0
# Without a throttle reply this long, the lane may use one connection more again.
RECOVER_AFTER = 300.0


@dataclass(frozen=True)
class Throttle:
    connections: int | None = None  # cap under the configured limit; None: no cap
    paused_until: float = 0.0
    streak: int = 0  # throttle replies since the last delivery that went through
    last_at: float = 0.0  # when the last throttle reply came
    replies: int = 0  # throttle replies in all (status, metrics)

    def on_throttled(
        self, now: float, in_use: int, *, retry_after: float | None = None
    ) -> Throttle:
        """A throttle reply on one of ``in_use`` connections."""
        cap = max(1, in_use - 1)
        if self.connections is not None:
            cap = min(cap, self.connections)
        pause = (
            retry_after
            if retry_after is not None
            else min(MAX_PAUSE, FIRST_PAUSE * 2.0 ** min(self.streak, 16))
        )
        return Throttle(
            connections=cap,
            paused_until=max(self.paused_until, now + pause),
            streak=self.streak + 1,
            last_at=now,
            replies=self.replies + 1,
        )

    def on_delivered(self, now: float, limit: int) -> Throttle:
        """A message went through: the refusals in a row are over; after a calm spell one
        more connection is allowed, up to ``limit``."""
        changed = replace(self, streak=0) if self.streak else self
        if changed.connections is None or now - changed.last_at < RECOVER_AFTER:
            return changed
        more = changed.connections + 1
        return replace(changed, connections=None if more >= limit else more, last_at=now)

    def connection_limit(self, configured: int) -> int:
        limit = max(1, configured)
        return limit if self.connections is None else max(1, min(limit, self.connections))

    def wait(self, now: float) -> float:
        """Seconds before the lane may start another attempt."""
        return max(0.0, self.paused_until - now)
