"""Browser sessions of the web pages, kept in the daemon's memory.

A session begins when a connect link is opened (it then remembers the link, never the token:
the browser is sent on to a URL without it) or when an operator opens the operator page.
It carries the CSRF token of its forms and the one sign-in it may have pending. The cookie
holds 256 random bits and nothing else; it is ``HttpOnly``, ``SameSite=Lax`` (sent on the
provider's top-level redirect back, not on cross-site posts) and ``Secure`` when the public
URL is HTTPS. A restart forgets every session: the owner opens the link again (an unused
link stays valid until it expires).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, field

from relayd.web.csrf import new_csrf_token
from relayd.web.pages import Notice
from relayd.web.signin import PendingSignIn

__all__ = ["COOKIE", "OPERATOR_COOKIE", "Session", "SessionBook"]

COOKIE = "relayd_session"
#: The operator page's own cookie (path /operator): an owner's session in the same browser
#: is another session.
OPERATOR_COOKIE = "relayd_operator"
SESSION_SECONDS = 3600.0
MAX_SESSIONS = 10_000


@dataclass
class Session:
    id: str = field(repr=False)
    created_at: float
    csrf: str = field(default_factory=new_csrf_token, repr=False)
    link: str | None = None  # the digest of the connect link it was opened with
    account: str | None = None
    connected: bool = False  # this session connected the account (link used)
    pending: PendingSignIn | None = None
    last_seen: float = 0.0
    admin: str | None = None  # the operator signed in with this session
    notices: list[Notice] = field(default_factory=list)  # shown once, on the next page

    def take_notices(self) -> list[Notice]:
        shown, self.notices = self.notices, []
        return shown


class SessionBook:
    def __init__(self) -> None:
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def new(self, now: float) -> Session:
        while len(self._sessions) >= MAX_SESSIONS:
            self._sessions.popitem(last=False)
        session = Session(id=secrets.token_urlsafe(32), created_at=now, last_seen=now)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None, now: float) -> Session | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        if now - session.created_at > SESSION_SECONDS:
            del self._sessions[session_id]
            return None
        session.last_seen = now
        self._sessions.move_to_end(session_id)
        return session

    def end(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
