"""The operator's page: every account as ``relayd status`` shows it, with buttons to create a
connect link and to pause or release an account.

Reachable only with an admin credential of ``web.admins`` (HTTP Basic, RFC 7617, over HTTPS
or loopback; checked against the scrypt hash, in a worker thread since scrypt takes tens of
milliseconds; a success is remembered for a few minutes so that each page view does not
pay it again). A browser resends Basic credentials by itself, to any request, so every
button is a form whose CSRF token belongs to the operator's session (OWASP: the
synchronizer token pattern); without it a POST is refused. Pause and release act on the
running scheduler through the operator commands of ``relayd.queue.commands``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
from collections.abc import Callable

from aiohttp import web

from relayd.config.model import AccountConfig
from relayd.core.routing import find_account
from relayd.log import redactor
from relayd.passwords import verify_password
from relayd.queue import commands
from relayd.queue.scheduler import Scheduler
from relayd.web.connect import Facts
from relayd.web.context import WebContext
from relayd.web.links import DEFAULT_LIFETIME, LinkStore
from relayd.web.pages import Notice, e, form, when
from relayd.web.sessions import OPERATOR_COOKIE, Session

__all__ = ["OperatorPage", "parse_basic"]

log = logging.getLogger(__name__)

TITLE = "relayd accounts"
REMEMBER_LOGIN_SECONDS = 300.0


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """``Authorization: Basic base64(user ":" password)`` (RFC 7617 §2), UTF-8."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


def _connectable(account: AccountConfig) -> bool:
    oauth = account.oauth
    return account.connect_password or (
        oauth is not None and account.password is None and oauth.flow == "delegated"
    )


class OperatorPage:
    def __init__(
        self,
        ctx: WebContext,
        *,
        scheduler: Scheduler,
        facts: Facts,
        released: Callable[[str], None],
    ) -> None:
        """``released(address)``: the operator released the account (its paused incident
        ends, so a new pause alerts again)."""
        self.ctx = ctx
        self.scheduler = scheduler
        self.facts = facts
        self.released = released
        self._remembered: dict[str, tuple[bytes, float]] = {}

    def routes(self) -> list[web.RouteDef]:
        base = self.ctx.base
        return [
            web.get(f"{base}/operator", self.show),
            web.post(f"{base}/operator/link", self.create_link),
            web.post(f"{base}/operator/pause", self.pause),
            web.post(f"{base}/operator/release", self.release),
        ]

    # -- who is asking ------------------------------------------------------------------

    async def _admin(self, request: web.Request) -> str | web.Response | None:
        """The admin's name; None when there is no valid credential; a 429 page when this
        client has tried too often."""
        ctx = self.ctx
        web_config = ctx.config.web
        admins = web_config.admins if web_config is not None else {}
        given = parse_basic(request.headers.get("Authorization"))
        if given is None or given[0] not in admins:
            return None
        name, password = given
        encoded = admins[name]
        fingerprint = hashlib.sha256(f"{encoded}\0{password}".encode()).digest()
        remembered = self._remembered.get(name)
        now = ctx.clock()
        if (
            remembered is not None
            and now - remembered[1] < REMEMBER_LOGIN_SECONDS
            and hmac.compare_digest(remembered[0], fingerprint)
        ):
            return name
        client = ctx.client(request)
        if not ctx.login_limit.allow(client, now):
            return ctx.too_many(ctx.login_limit, client)
        if not await asyncio.to_thread(verify_password, password, encoded):
            log.warning("operator page: wrong password for %s from %s", name, client)
            return None
        self._remembered[name] = (fingerprint, now)
        redactor.add_secret(password)
        return name

    def _challenge(self) -> web.Response:
        response = self.ctx.refusal(
            401, "Sign in", "The operator page needs an admin name and password (web.admins)."
        )
        response.headers["WWW-Authenticate"] = 'Basic realm="relayd operator", charset="UTF-8"'
        return response

    async def _authorised(self, request: web.Request) -> tuple[str, Session | None] | web.Response:
        admin = await self._admin(request)
        if isinstance(admin, web.Response):
            return admin
        if admin is None:
            return self._challenge()
        session = self.ctx.session_of(request, OPERATOR_COOKIE)
        if session is not None and session.admin != admin:
            session = None
        return admin, session

    # -- GET /operator ------------------------------------------------------------------

    async def show(self, request: web.Request) -> web.Response:
        ctx = self.ctx
        who = await self._authorised(request)
        if isinstance(who, web.Response):
            return who
        admin, session = who
        fresh = session is None
        if session is None:
            session = ctx.sessions.new(ctx.clock())
            session.admin = admin
        facts = await self.facts()
        here = f"{ctx.base}/operator"
        rows = []
        by_address = {a.address: a for a in ctx.config.accounts()}
        for f in facts:
            account = by_address.get(f.address)
            state = f.state if not f.why or f.state == "ok" else f"{f.state}: {f.why}"
            error = "-" if f.last_error_at is None else f"{when(f.last_error_at)} {f.last_error}"
            hidden = [("account", f.address)]
            actions = []
            if account is not None and _connectable(account):
                actions.append(
                    form(f"{here}/link", session.csrf, "Create link", fields=hidden, inline=True)
                )
            if f.state == "paused":
                actions.append(
                    form(f"{here}/release", session.csrf, "Release", fields=hidden, inline=True)
                )
            else:
                actions.append(
                    form(f"{here}/pause", session.csrf, "Pause", fields=hidden, inline=True)
                )
            cells = (
                f.address,
                state,
                when(f.last_success_at),
                error,
                f.queued,
                f.sent_copy_backlog,
            )
            rows.append(
                "<tr>"
                + "".join(f"<td>{e(c)}</td>" for c in cells)
                + f"<td>{' '.join(actions)}</td></tr>"
            )
        head = "".join(
            f"<th scope=col>{h}</th>"
            for h in ("Account", "State", "Last success", "Last error", "Queued", "Sent copy", "")
        )
        body = (
            f"<p>Signed in as {e(admin)}.</p><table><thead><tr>{head}</tr></thead><tbody>"
            + ("".join(rows) or "<tr><td colspan=7>No accounts configured.</td></tr>")
            + "</tbody></table>"
        )
        response = ctx.html(TITLE, body, notices=session.take_notices())
        if fresh:
            ctx.set_cookie(response, session, cookie=OPERATOR_COOKIE, path="/operator")
        return response

    # -- the buttons ----------------------------------------------------------------------

    async def _action(
        self, request: web.Request
    ) -> tuple[str, Session, AccountConfig] | web.Response:
        who = await self._authorised(request)
        if isinstance(who, web.Response):
            return who
        admin, session = who
        fields = await self.ctx.checked_form(request, session)
        if isinstance(fields, web.Response):
            return fields
        assert session is not None
        account = find_account(self.ctx.config, fields.get("account", ""))
        if account is None or account.address != fields.get("account", "").lower():
            return self.ctx.refusal(404, "Unknown account", "No such account is configured.")
        return admin, session, account

    def _back(self) -> web.Response:
        return self.ctx.redirect(f"{self.ctx.base}/operator")

    async def create_link(self, request: web.Request) -> web.Response:
        found = await self._action(request)
        if isinstance(found, web.Response):
            return found
        admin, session, account = found
        if not _connectable(account):
            session.notices.append(
                Notice("error", f"{account.address} has nothing to connect on the web page")
            )
            return self._back()
        store = LinkStore(self.ctx.config.state_directory)
        token = await asyncio.to_thread(store.create, account.address, DEFAULT_LIFETIME)
        log.info("connect link created by %s", admin, extra={"account": account.address})
        link = f"{self.ctx.public_url}/connect/{token}"
        # The one page that shows a link token: the operator asked for it, to pass it on.
        body = (
            f"<p>Send this link to the owner of {e(account.address)}. It works once and "
            "expires in 24 hours; it is shown only now.</p>"
            f"<p><code>{e(link)}</code></p>"
            f'<p><a href="{e(self.ctx.base)}/operator">Back to the accounts</a></p>'
        )
        return self.ctx.html("Connect link", body)

    async def pause(self, request: web.Request) -> web.Response:
        found = await self._action(request)
        if isinstance(found, web.Response):
            return found
        admin, session, account = found
        paused = commands.pause_account(
            self.scheduler, self.scheduler.book, account.address, self.ctx.clock()
        )
        log.info(
            "paused by the operator %s (%d messages held)",
            admin,
            paused.moved,
            extra={"account": account.address},
        )
        session.notices.append(
            Notice("ok", f"{account.address} paused", ("Its mail is accepted and held.",))
        )
        return self._back()

    async def release(self, request: web.Request) -> web.Response:
        found = await self._action(request)
        if isinstance(found, web.Response):
            return found
        admin, session, account = found
        released = commands.release_account(self.scheduler, self.scheduler.book, account.address)
        self.released(account.address)
        log.info(
            "released by the operator %s (was paused: %s)",
            admin,
            released.before.paused,
            extra={"account": account.address},
        )
        session.notices.append(
            Notice("ok", f"{account.address} released", ("Its held mail is being delivered.",))
        )
        return self._back()
