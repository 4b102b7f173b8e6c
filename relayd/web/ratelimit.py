"""A per-client rate limit for the link and login pages: a sliding window, pure.

Link tokens have 256 bits and admin passwords are scrypt-hashed, so guessing is hopeless
anyway; the limit keeps a guesser from costing scrypt time and log lines, and keeps the
password form from being used to hammer a provider's login (which would get the account's
address throttled there, or locked).
"""

from __future__ import annotations

from collections import deque

__all__ = ["RateLimit"]


class RateLimit:
    """At most ``limit`` events per ``window`` seconds per key (a client address)."""

    def __init__(self, limit: int, window: float, *, max_keys: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._events: dict[str, deque[float]] = {}

    def allow(self, key: str, now: float) -> bool:
        """Count one event for ``key``; False (and not counted) when over the limit."""
        events = self._events.get(key)
        if events is None:
            if len(self._events) >= self.max_keys:
                self._forget_idle(now)
            events = self._events.setdefault(key, deque())
        while events and now - events[0] >= self.window:
            events.popleft()
        if len(events) >= self.limit:
            return False
        events.append(now)
        return True

    def retry_after(self, key: str, now: float) -> float:
        events = self._events.get(key)
        if not events or len(events) < self.limit:
            return 0.0
        return max(0.0, self.window - (now - events[0]))

    def _forget_idle(self, now: float) -> None:
        for key in [k for k, v in self._events.items() if not v or now - v[-1] >= self.window]:
            del self._events[key]
        if len(self._events) >= self.max_keys:  # a flood of addresses: start afresh
            self._events.clear()
