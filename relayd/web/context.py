"""What the connect and operator pages share: the configuration in force, the sessions, the
rate limits, and the answers every page gives (security headers, the session cookie, CSRF).

Every answer is ``Cache-Control: no-store`` (the pages show account state and carry
one-time forms), framed by nobody, and under a Content-Security-Policy that allows no script
at all and styles only from relayd's own style sheet; forms may post only to relayd, and a
page that sends the browser to a provider names that provider's origin too (browsers apply
``form-action`` to the redirect after a form post).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from aiohttp import web

from relayd.config.model import Config
from relayd.web.csrf import FIELD, origin_allowed, token_matches
from relayd.web.pages import Notice, page
from relayd.web.ratelimit import RateLimit
from relayd.web.sessions import COOKIE, SESSION_SECONDS, Session, SessionBook

__all__ = ["WebContext", "origin_of"]

#: Opening links: generous for a person, useless for a guesser.
LINK_LIMIT = (20, 600.0)
#: Login attempts (admin credentials, app passwords tried at the provider).
LOGIN_LIMIT = (10, 600.0)


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def security_headers(extra_form_action: Sequence[str], https: bool) -> dict[str, str]:
    form_action = " ".join(["'self'", *extra_form_action])
    headers = {
        "Cache-Control": "no-store",
        "Pragma": "no-cache",
        "Content-Security-Policy": (
            "default-src 'none'; style-src 'self'; img-src 'self'; "
            f"form-action {form_action}; frame-ancestors 'none'; base-uri 'none'"
        ),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "same-origin",
    }
    if https:
        headers["Strict-Transport-Security"] = "max-age=31536000"
    return headers


@dataclass
class WebContext:
    config: Config
    clock: Callable[[], float] = time.time
    sessions: SessionBook = field(default_factory=SessionBook)
    link_limit: RateLimit = field(default_factory=lambda: RateLimit(*LINK_LIMIT))
    login_limit: RateLimit = field(default_factory=lambda: RateLimit(*LOGIN_LIMIT))

    @property
    def public_url(self) -> str:
        assert self.config.web is not None
        return self.config.web.public_url

    @property
    def base(self) -> str:
        """The path under which the pages live (a reverse proxy may add one)."""
        return urlsplit(self.public_url).path.rstrip("/")

    @property
    def https(self) -> bool:
        return self.public_url.startswith("https:")

    def client(self, request: web.Request) -> str:
        return request.remote or "-"

    # -- answers --------------------------------------------------------------------------

    def html(
        self,
        title: str,
        body: str,
        *,
        status: int = 200,
        notices: Sequence[Notice] = (),
        form_action: Sequence[str] = (),
    ) -> web.Response:
        return web.Response(
            text=page(title, body, base=self.base, notices=notices),
            status=status,
            content_type="text/html",
            charset="utf-8",
            headers=security_headers(form_action, self.https),
        )

    def refusal(self, status: int, title: str, *lines: str) -> web.Response:
        return self.html(title, "", status=status, notices=[Notice("error", title, lines)])

    def redirect(self, location: str, *, form_action: Sequence[str] = ()) -> web.Response:
        """303 See Other: after a POST, the browser GETs the next page (no re-post)."""
        response = web.Response(status=303, headers=security_headers(form_action, self.https))
        response.headers["Location"] = location
        return response

    def too_many(self, limit: RateLimit, key: str) -> web.Response:
        wait = max(1, int(limit.retry_after(key, self.clock())))
        response = self.refusal(429, "Too many attempts", f"Try again in {wait} seconds.")
        response.headers["Retry-After"] = str(wait)
        return response

    # -- sessions and CSRF -----------------------------------------------------------------

    def session_of(self, request: web.Request, cookie: str = COOKIE) -> Session | None:
        return self.sessions.get(request.cookies.get(cookie), self.clock())

    def set_cookie(
        self,
        response: web.StreamResponse,
        session: Session,
        *,
        cookie: str = COOKIE,
        path: str = "",
    ) -> None:
        response.set_cookie(
            cookie,
            session.id,
            max_age=int(SESSION_SECONDS),
            path=self.base + path or "/",
            secure=self.https,
            httponly=True,
            samesite="Lax",
        )

    async def checked_form(
        self, request: web.Request, session: Session | None
    ) -> dict[str, str] | web.Response:
        """The posted form, if its CSRF token is the session's and its origin relayd's; else
        the 403 page to answer with."""
        form = await request.post()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        served_at = f"{request.scheme}://{request.host}"
        if session is None or not token_matches(session.csrf, fields.get(FIELD)):
            return self.refusal(
                403,
                "Refused",
                "The form has expired or did not come from this page.",
                "Reload the page and try again.",
            )
        if not origin_allowed(request.headers.get("Origin"), self.public_url, served_at):
            return self.refusal(403, "Refused", "The form was posted from another site.")
        return fields
