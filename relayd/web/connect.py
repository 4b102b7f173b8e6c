"""The mailbox owner's pages: open the link, sign in or give the app password, see the
result and the account's state, send a test message.

``GET /connect/{token}`` looks the link up and, if it is valid, starts a browser session
bound to it and sends the browser on to ``/connect``: the token leaves the address bar and
the history at once, and is never in a page, a log line or a Referer (the page that had it
in its URL is never rendered, and ``Referrer-Policy: same-origin`` keeps every page's URL
from other sites). The link is used up only when the account has been connected through it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from relayd.config.model import AccountConfig
from relayd.core.routing import find_account
from relayd.log import redactor
from relayd.oauth.codeflow import CodeFlow, authorization_url, code_flow_for, redeem_code
from relayd.oauth.consent import save_consent
from relayd.oauth.passwords import ConnectedPassword, PasswordStore
from relayd.oauth.sealed import SealedFilesError
from relayd.oauth.store import TokenStore
from relayd.oauth.tokens import TokenError
from relayd.upstream.credentials import CredentialSource
from relayd.web.context import WebContext, origin_of
from relayd.web.links import Link, LinkState, LinkStore, link_state
from relayd.web.pages import AccountFacts, Notice, e, facts_table, form
from relayd.web.sessions import Session
from relayd.web.signin import IdentityProblem, begin_sign_in, check_callback, check_identity
from relayd.web.trial import send_test_message, try_password

__all__ = ["ConnectPages", "Facts"]

log = logging.getLogger(__name__)

#: () -> what ``relayd status`` shows, for every account.
Facts = Callable[[], Awaitable[Sequence[AccountFacts]]]

TITLE = "Connect your mailbox"
_ENDED = {
    LinkState.USED: "This link has been used already: the mailbox was connected with it.",
    LinkState.EXPIRED: "This link has expired.",
}
_ASK_AGAIN = "Ask the administrator of relayd for a new link."


class ConnectPages:
    def __init__(
        self,
        ctx: WebContext,
        *,
        credentials: CredentialSource,
        facts: Facts,
        stored: Callable[[], None],
    ) -> None:
        self.ctx = ctx
        self.credentials = credentials  # the daemon's: the test message
        self.facts = facts
        # Tells the daemon at once, so the account state shown next already counts the new
        # consent (held mail released) rather than the pause it replaces.
        self.stored = stored

    def routes(self) -> list[web.RouteDef]:
        base = self.ctx.base
        return [
            # Before /connect/{token}: "callback" is no token.
            web.get(f"{base}/connect/callback", self.callback),
            web.get(f"{base}/connect/{{token}}", self.open_link),
            web.get(f"{base}/connect", self.show),
            web.post(f"{base}/connect/signin", self.sign_in),
            web.post(f"{base}/connect/password", self.password),
            web.post(f"{base}/connect/test", self.test_message),
        ]

    # -- helpers ----------------------------------------------------------------------------

    @property
    def _links(self) -> LinkStore:
        return LinkStore(self.ctx.config.state_directory)

    def _here(self) -> str:
        return f"{self.ctx.base}/connect"

    def _redirect_uri(self) -> str:
        return f"{self.ctx.public_url}/connect/callback"

    def _account(self, session: Session | None) -> AccountConfig | None:
        if session is None or session.account is None:
            return None
        return find_account(self.ctx.config, session.account)

    def _link(self, session: Session) -> Link | None:
        return self._links.by_digest(session.link) if session.link else None

    def _link_problem(self, session: Session) -> str | None:
        """Why this session may not connect its account (any more), or None."""
        link = self._link(session)
        if link is None:
            return "This link is not valid. " + _ASK_AGAIN
        state = link_state(link, self.ctx.clock())
        if state is not LinkState.VALID:
            return _ENDED[state] + " " + _ASK_AGAIN
        return None

    def _use_link(self, session: Session) -> None:
        link = self._link(session)
        if link is not None:
            self._links.use(link)
        session.connected = True

    def _no_session(self) -> web.Response:
        return self.ctx.refusal(
            400,
            "Open your link again",
            "This page belongs to a connect link; open the link "
            "you were sent (it stays valid until the mailbox is connected or it expires).",
        )

    # -- GET /connect/{token} ---------------------------------------------------------------

    async def open_link(self, request: web.Request) -> web.Response:
        ctx = self.ctx
        token = request.match_info["token"]
        redactor.add_secret(token)  # before anything could log it
        client = ctx.client(request)
        if not ctx.link_limit.allow(client, ctx.clock()):
            return ctx.too_many(ctx.link_limit, client)
        link = await asyncio.to_thread(self._links.find, token)
        if link is None:
            return ctx.refusal(404, "Unknown link", "This link is not valid. " + _ASK_AGAIN)
        state = link_state(link, ctx.clock())
        if state is not LinkState.VALID:
            return ctx.refusal(410, "Link no longer valid", _ENDED[state], _ASK_AGAIN)
        if find_account(ctx.config, link.account) is None:
            return ctx.refusal(404, "Unknown account", f"{link.account} is not configured.")
        session = ctx.sessions.new(ctx.clock())
        session.link, session.account = link.digest, link.account
        response = ctx.redirect(self._here())
        ctx.set_cookie(response, session)
        return response

    # -- GET /connect -------------------------------------------------------------------

    async def show(self, request: web.Request) -> web.Response:
        ctx = self.ctx
        session = ctx.session_of(request)
        account = self._account(session)
        if session is None or account is None:
            return self._no_session()
        notices = session.take_notices()
        body = [
            f"<p>relayd sends the mail of your applications through <strong>"
            f"{e(account.address)}</strong>.</p>"
        ]
        form_action: list[str] = []
        problem = None if session.connected else self._link_problem(session)
        if session.connected:
            body.append(
                "<p>Your mailbox is connected. You can check it with a test message, sent "
                "through your mailbox to yourself.</p>"
                + form(f"{self._here()}/test", session.csrf, "Send me a test message")
            )
        elif problem is not None:
            notices.append(Notice("error", "Cannot connect", (problem,)))
        elif account.connect_password:
            body.append(self._password_form(account, session))
        elif account.oauth is not None:
            flow = code_flow_for(account)
            if isinstance(flow, CodeFlow):
                body.append(
                    f"<p>Sign in as <strong>{e(account.address)}</strong> and allow relayd "
                    "to send mail (and file copies in your Sent folder) for you.</p>"
                    + form(f"{self._here()}/signin", session.csrf, f"Sign in with {flow.provider}")
                )
                form_action.append(origin_of(flow.authorize_url))
            else:
                notices.append(Notice("error", "No sign-in page for this account", (flow,)))
        else:
            notices.append(
                Notice(
                    "info",
                    "Nothing to connect",
                    ("This account needs nothing from you: relayd has what it logs in with.",),
                )
            )
        body.append("<h2>Your account in relayd</h2>")
        facts = await self._facts_of(account.address)
        body.append(facts_table(facts) if facts is not None else "<p>-</p>")
        return ctx.html(TITLE, "".join(body), notices=notices, form_action=form_action)

    def _password_form(self, account: AccountConfig, session: Session) -> str:
        field = (
            f"<p><label for=password>App password for {e(account.address)}</label><br>"
            "<input type=password id=password name=password required "
            "autocomplete=new-password spellcheck=false></p>"
        )
        return (
            "<p>Create an app password for relayd in your mailbox's security settings "
            "(Google: 2-Step Verification, then App passwords; iCloud, Yahoo, Fastmail and "
            "Zoho likewise) and enter it here. relayd tests it with your provider before "
            "saving it, encrypted.</p>"
            + form(f"{self._here()}/password", session.csrf, "Test & connect", inner=field)
        )

    async def _facts_of(self, address: str) -> AccountFacts | None:
        try:
            found = await self.facts()
        except Exception:  # the page still works without the report
            log.exception("cannot gather the account's status")
            return None
        return next((f for f in found if f.address == address), None)

    # -- POST /connect/signin → the provider ----------------------------------------------

    async def sign_in(self, request: web.Request) -> web.Response:
        ctx = self.ctx
        session = ctx.session_of(request)
        fields = await ctx.checked_form(request, session)
        if isinstance(fields, web.Response):
            return fields
        assert session is not None
        account = self._account(session)
        problem = self._link_problem(session)
        if account is None or problem is not None:
            session.notices.append(Notice("error", "Cannot connect", (problem or "",)))
            return ctx.redirect(self._here())
        flow = code_flow_for(account)
        if not isinstance(flow, CodeFlow):
            return ctx.redirect(self._here())
        pending = begin_sign_in(account, ctx.clock())
        session.pending = pending
        url = authorization_url(
            flow,
            redirect_uri=self._redirect_uri(),
            state=pending.state,
            verifier=pending.verifier,
            nonce=pending.nonce,
            login_hint=account.address,
        )
        log.info("web sign-in started with %s", flow.provider, extra={"account": account.address})
        return ctx.redirect(url, form_action=[origin_of(flow.authorize_url)])

    # -- GET /connect/callback ← the provider ----------------------------------------------

    async def callback(self, request: web.Request) -> web.Response:
        ctx = self.ctx
        client = ctx.client(request)
        if not ctx.login_limit.allow(client, ctx.clock()):
            return ctx.too_many(ctx.login_limit, client)
        session = ctx.session_of(request)
        account = self._account(session)
        if session is None or account is None:
            return self._no_session()
        query = {k: v for k, v in request.query.items()}
        for secret in (query.get("code"), query.get("state")):
            if secret:
                redactor.add_secret(secret)
        # The pending sign-in answers one callback only, whatever it says (RFC 6749 §10.12).
        pending, session.pending = session.pending, None
        verdict = check_callback(pending, query, ctx.clock())
        if not verdict.ok or pending is None or verdict.code is None:
            why = verdict.refusal.value if verdict.refusal else "The sign-in failed."
            if verdict.detail:
                why += f": {verdict.detail}"
            self._not_stored(session, account, why)
            return ctx.redirect(self._here())
        problem = self._link_problem(session)
        flow = code_flow_for(account)
        if problem is not None or not isinstance(flow, CodeFlow):
            self._not_stored(session, account, problem or "This account has no sign-in.")
            return ctx.redirect(self._here())
        try:
            grant = await asyncio.to_thread(
                redeem_code,
                flow,
                account,
                code=verdict.code,
                redirect_uri=self._redirect_uri(),
                verifier=pending.verifier,
            )
        except TokenError as exc:
            self._not_stored(session, account, f"The provider refused the sign-in: {exc}")
            return ctx.redirect(self._here())
        for secret in (grant.consent.access_token, grant.consent.refresh_token):
            redactor.add_secret(secret)
        identity = check_identity(
            grant.claims,
            account,
            client_id=flow.client_id,
            nonce=pending.nonce,
            now=ctx.clock(),
        )
        if identity.problem is IdentityProblem.OTHER_IDENTITY:
            self._not_stored(
                session,
                account,
                f"You signed in as {identity.who}, but this page connects {account.address}.",
                f"Sign out of {identity.who} at {flow.provider} (or use a private window) and "
                f"sign in as {account.address}.",
            )
            return ctx.redirect(self._here())
        if identity.problem is not None:
            self._not_stored(session, account, identity.problem.value)
            return ctx.redirect(self._here())
        store = TokenStore(ctx.config.state_directory, key=ctx.config.tokens_key)
        try:
            await asyncio.to_thread(save_consent, store, account, grant.consent)
        except (SealedFilesError, OSError) as exc:
            self._not_stored(session, account, f"relayd could not store the tokens: {exc}")
            return ctx.redirect(self._here())
        self._use_link(session)
        self.stored()
        log.info(
            "connected on the web page: OAuth tokens stored (signed in as %s)",
            identity.who,
            extra={"account": account.address},
        )
        session.notices.append(self._connected_notice(account))
        return ctx.redirect(self._here())

    def _not_stored(self, session: Session, account: AccountConfig, *why: str) -> None:
        log.warning(
            "web connect refused, nothing stored: %s",
            " ".join(why),
            extra={"account": account.address},
        )
        session.notices.append(Notice("error", "Not connected: nothing was stored", why))

    def _connected_notice(self, account: AccountConfig) -> Notice:
        return Notice(
            "ok",
            "Connected",
            (
                f"relayd now sends the mail of your applications through {account.address}. "
                "Mail that waited for this is on its way.",
            ),
        )

    # -- POST /connect/password -----------------------------------------------------------

    async def password(self, request: web.Request) -> web.Response:
        ctx = self.ctx
        session = ctx.session_of(request)
        fields = await ctx.checked_form(request, session)
        if isinstance(fields, web.Response):
            return fields
        assert session is not None
        account = self._account(session)
        password = fields.get("password", "").strip()
        if password:
            redactor.add_secret(password)
        if account is None or not account.connect_password:
            return ctx.redirect(self._here())
        problem = self._link_problem(session)
        if problem is not None:
            session.notices.append(Notice("error", "Cannot connect", (problem,)))
            return ctx.redirect(self._here())
        # Per client and per mailbox: repeated wrong logins get an address locked or
        # throttled at the provider.
        for key in (ctx.client(request), f"account:{account.address}"):
            if not ctx.login_limit.allow(key, ctx.clock()):
                return ctx.too_many(ctx.login_limit, key)
        if not password:
            session.notices.append(Notice("error", "Not saved", ("Enter the app password.",)))
            return ctx.redirect(self._here())
        result = await try_password(account, password, ctx.config.helo_name)
        if not result.ok:
            lines = [f"{result.step} login refused: {result.said}"]
            if result.hint:
                lines.append(result.hint)
            self._not_stored(session, account, *lines)
            return ctx.redirect(self._here())
        store = PasswordStore(ctx.config.state_directory, key=ctx.config.tokens_key)
        try:
            await asyncio.to_thread(store.save, ConnectedPassword(account.address, password))
        except (SealedFilesError, OSError) as exc:
            self._not_stored(session, account, f"relayd could not store the password: {exc}")
            return ctx.redirect(self._here())
        self._use_link(session)
        self.stored()
        log.info(
            "connected on the web page: app password tested (%s) and stored",
            result.step,
            extra={"account": account.address},
        )
        session.notices.append(self._connected_notice(account))
        return ctx.redirect(self._here())

    # -- POST /connect/test -------------------------------------------------------------

    async def test_message(self, request: web.Request) -> web.Response:
        ctx = self.ctx
        session = ctx.session_of(request)
        fields = await ctx.checked_form(request, session)
        if isinstance(fields, web.Response):
            return fields
        assert session is not None
        account = self._account(session)
        if account is None or not session.connected:
            return ctx.redirect(self._here())
        if not ctx.login_limit.allow(f"test:{account.address}", ctx.clock()):
            return ctx.too_many(ctx.login_limit, f"test:{account.address}")
        result = await send_test_message(account, self.credentials, ctx.config.helo_name)
        if result.ok:
            session.notices.append(
                Notice(
                    "ok",
                    "Test message sent",
                    (f"To {account.address}, {result.said}. Look in your inbox.",),
                )
            )
        else:
            lines = tuple(x for x in (f"{result.step}: {result.said}", result.hint) if x)
            session.notices.append(Notice("error", "The test message was not sent", lines))
        return ctx.redirect(self._here())
