"""The web connect page against the real world: a real browser (Chromium) plays the mailbox
owner, signs in at the suite's OAuth server's login/consent page, and the account then
delivers through Postfix with XOAUTH2 (Dovecot checks each token at the OAuth server); app
passwords are tried live against Postfix and Dovecot before they are saved. Nothing is
mocked between relayd and those servers.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from mailworld.oauth_server import OAuthServer
from mailworld.world import MailWorld

from relayd.oauth.passwords import PasswordStore
from relayd.oauth.store import TokenStore
from relayd.passwords import hash_password

from .browser import Browser, new_profile, remove_profile, require_browser
from .conftest import NewMailbox, RelaydSetup, RelaydSetupFactory
from .ops_cli import relayd_cli, relayd_json, wait_until
from .relayd_proc import free_port, proc_stats, write_secret
from .test_oauth import GOOGLE_SECRET, sasl_logins, smtp_to, submit

pytestmark = pytest.mark.integration

WEB_MS_CLIENT = "ms-web-client"
WEB_GOOGLE_CLIENT = "google-web-client"
ADMIN_PASSWORD = "admin-" + "pw-for-the-operator-page"


@pytest.fixture
def oauth(mail_world: MailWorld) -> Iterator[OAuthServer]:
    server = mail_world.oauth
    server.add_client(WEB_MS_CLIENT, consent_page=True)
    server.add_client(WEB_GOOGLE_CLIENT, GOOGLE_SECRET, consent_page=True)
    yield server


@pytest.fixture
def browser(mail_world: MailWorld) -> Iterator[Browser]:
    require_browser()
    profile = new_profile()  # a fresh profile: no cookie or sign-in of another test
    chromium = Browser(mail_world.pki.server_cert, profile)
    try:
        yield chromium
    finally:
        chromium.close()
        remove_profile(profile)
        print(f"\nscreenshots: {chromium.shots}")


def with_web(setup: RelaydSetup) -> str:
    """Add the web listener (loopback, plain HTTP) to the config; its base URL."""
    port = free_port()
    setup.config["web"] = {
        "address": f"127.0.0.1:{port}",
        "admins": {"ops": hash_password(ADMIN_PASSWORD)},
    }
    setup.rewrite_config()
    return f"http://127.0.0.1:{port}"


def connect_link(setup: RelaydSetup, address: str, *extra: str) -> str:
    result = relayd_cli(setup.config_path, "connect", address, *extra)
    assert result.returncode == 0, result.stderr
    (link,) = result.stdout.split()
    assert "works once" in result.stderr
    return link


def microsoft_web_setup(
    relayd_setup: RelaydSetupFactory, world: MailWorld, server: OAuthServer, address: str
) -> tuple[RelaydSetup, str]:
    tenant = {
        "provider": "microsoft365",
        "smtp": smtp_to(world),
        "sent_copy": "never",
        "oauth": {
            "client_id": WEB_MS_CLIENT,
            "authority": server.authority("contoso"),
            "ca_file": str(world.pki.ca_cert),
        },
        "accounts": [{"address": address, "oauth": {"flow": "delegated"}}],
    }
    setup = relayd_setup({"ms": tenant}, may_send_as=[address])
    return setup, with_web(setup)


def google_web_setup(
    relayd_setup: RelaydSetupFactory,
    world: MailWorld,
    server: OAuthServer,
    address: str,
    secrets: Path,
) -> tuple[RelaydSetup, str]:
    secret = write_secret(secrets / "google-web-client", GOOGLE_SECRET)
    tenant = {
        "provider": "gmail",
        "smtp": smtp_to(world, "implicit"),
        "sent_copy": "never",
        "oauth": {
            "flow": "delegated",
            "client_id": WEB_GOOGLE_CLIENT,
            "client_secret": {"file": str(secret)},
            "token_url": server.google_token_url,
            "authority": server.google_auth_url,
            "ca_file": str(world.pki.ca_cert),
        },
        "accounts": [{"address": address}],
    }
    setup = relayd_setup({"g": tenant}, may_send_as=[address])
    return setup, with_web(setup)


def tokens(setup: RelaydSetup) -> TokenStore:
    return TokenStore(setup.dir / "state", fsync=False)


def accepting_processes(main_pid: int) -> list[int]:
    return [pid for pid, fields in proc_stats() if int(fields[1]) == main_pid]


def maps_mention(pid: int, needle: str) -> bool:
    with open(f"/proc/{pid}/maps") as maps:
        return needle in maps.read()


# -- the owner in a browser ---------------------------------------------------------------


def test_browser_connects_a_microsoft_mailbox_then_it_delivers_with_xoauth2(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,
    browser: Browser,
) -> None:
    alice, rcpt = new_mailbox("webms"), new_mailbox("rcpt")
    setup, base = microsoft_web_setup(relayd_setup, mail_world, oauth, alice.address)
    setup.relayd.start()
    # Mail waits for the consent: held, not lost.
    submit(setup, alice.address, rcpt.address, "held until connected")
    setup.relayd.wait_for_log("status=held", timeout=30)
    link = connect_link(setup, alice.address)
    assert link.startswith(f"{base}/connect/")
    token = link.rsplit("/", 1)[1]

    browser.open(link)
    assert browser.url == f"{base}/connect"  # the token left the address bar at once
    assert "Sign in with Microsoft" in browser.text()
    assert alice.address in browser.text()
    browser.screenshot("ms-1-connect-page")
    browser.click("Sign in with Microsoft")
    assert browser.url.startswith(oauth.authority("contoso") + "/oauth2/v2.0/authorize?")
    query = parse_qs(urlsplit(browser.url).query)
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"]
    assert "code_verifier" not in query
    browser.screenshot("ms-2-provider-sign-in")
    browser.click("Allow")  # as the login hint, alice
    assert browser.url == f"{base}/connect"
    page = browser.text()
    assert "Connected" in page and "nothing was stored" not in page
    # The daemon heard of the consent before the page was drawn: no stale "needs consent".
    assert "needs consent" not in page, page
    browser.screenshot("ms-3-connected")

    stored = tokens(setup).load(alice.address)
    assert stored is not None and stored.refresh_token in oauth.state.refresh
    # The running daemon sees the new consent and sends what it held.
    got = mail_world.wait_for_messages(rcpt.name, 1, timeout=30)
    assert b"Subject: held until connected" in got[0]
    assert sasl_logins(mail_world, alice.address) == ["XOAUTH2"]

    browser.click("Send me a test message")
    assert "Test message sent" in browser.text()
    browser.screenshot("ms-4-test-message")
    mine = mail_world.wait_for_messages(alice.name, 1, timeout=30)
    assert b"Subject: relayd test message" in mine[0]

    # The state is shown as `relayd status` has it.
    wait_until(
        lambda: relayd_json(setup.config_path, "status")["accounts"][0]["state"] == "ok",
        what="the account ok",
    )
    browser.open(f"{base}/connect")
    assert re.search(r"State\s+ok\s+Last success\s+\d{4}-", browser.text()), browser.text()

    # Single use: the link is spent.
    browser.open(link)
    assert "already" in browser.text() and "Connected" not in browser.text()
    browser.screenshot("ms-5-link-used")

    # Only the main process serves the web: the accepting processes never loaded aiohttp.
    assert setup.relayd.proc is not None
    children = accepting_processes(setup.relayd.proc.pid)
    assert children and not any(maps_mention(pid, "aiohttp") for pid in children)
    assert maps_mention(setup.relayd.proc.pid, "aiohttp")
    log = setup.relayd.log()
    assert token not in log and "code_verifier" not in log
    assert setup.relayd.stop() == 0


def test_browser_signed_in_as_another_identity_stores_nothing(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,
    browser: Browser,
    tmp_path: Path,
) -> None:
    bob, mallory, rcpt = new_mailbox("webg"), new_mailbox("mallory"), new_mailbox("rcpt")
    setup, _ = google_web_setup(relayd_setup, mail_world, oauth, bob.address, tmp_path / "secrets")
    setup.relayd.start()
    link = connect_link(setup, bob.address)
    browser.open(link)
    browser.click("Sign in with Google")
    browser.fill("username", mallory.address)
    browser.screenshot("google-1-signing-in-as-someone-else")
    browser.click("Allow")
    page = browser.text()
    assert "Not connected: nothing was stored" in page
    assert f"You signed in as {mallory.address}, but this page connects {bob.address}" in page
    browser.screenshot("google-2-wrong-identity")
    assert tokens(setup).load(bob.address) is None
    assert not (setup.dir / "state" / "tokens").exists() or not any(
        p.suffix == ".tokens" for p in (setup.dir / "state" / "tokens").iterdir()
    )

    # The link is not used up by a wrong sign-in: the owner tries again, as themselves.
    browser.open(link)
    browser.click("Sign in with Google")
    browser.click("Allow")
    assert "Connected" in browser.text()
    browser.screenshot("google-3-connected")
    submit(setup, bob.address, rcpt.address, "after the web consent")
    mail_world.wait_for_messages(rcpt.name, 1, timeout=30)
    assert sasl_logins(mail_world, bob.address) == ["XOAUTH2"]
    assert setup.relayd.stop() == 0


def test_browser_app_password_tried_live_before_it_is_saved(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    browser: Browser,
) -> None:
    carol, rcpt = new_mailbox("webpw"), new_mailbox("rcpt")
    tenant = {
        "provider": "custom",
        "smtp": smtp_to(mail_world),
        "imap": {
            "host": "127.0.0.1",
            "port": mail_world.imaps_port,
            "tls": "implicit",
            "ca_file": str(mail_world.pki.ca_cert),
        },
        "sent_copy": "always",
        "accounts": [{"address": carol.address, "password": {"connect": True}}],
    }
    setup = relayd_setup({"t": tenant}, may_send_as=[carol.address])
    with_web(setup)
    state = setup.dir / "state"
    setup.relayd.start()
    submit(setup, carol.address, rcpt.address, "waits for the app password")
    setup.relayd.wait_for_log("no app password connected yet", timeout=30)
    status = relayd_json(setup.config_path, "status")["accounts"][0]
    assert status["state"] == "not connected" and "relayd connect" in status["fix"]

    link = connect_link(setup, carol.address)
    browser.open(link)
    assert "Test & connect" in browser.text()
    browser.screenshot("password-1-form")
    wrong = "wrong-" + carol.password
    browser.fill("password", wrong)
    browser.click("Test & connect")
    page = browser.text()
    assert "Not connected: nothing was stored" in page
    assert "SMTP login refused: 535" in page
    assert "The provider refused the username or password" in page  # relayd's hint
    assert wrong not in browser.driver.page_source
    browser.screenshot("password-2-refused")
    assert PasswordStore(state).load(carol.address) is None

    browser.fill("password", carol.password)
    browser.click("Test & connect")
    assert "Connected" in browser.text()
    browser.screenshot("password-3-connected")
    assert carol.password not in browser.driver.page_source
    stored = PasswordStore(state).load(carol.address)
    assert stored is not None and stored.password == carol.password
    # Encrypted: the password is in no file of the state directory.
    for path in state.rglob("*"):
        if path.is_file() and not path.is_socket():
            assert carol.password.encode() not in path.read_bytes(), path
    # The held mail goes out with the stored password, and its Sent copy over IMAP.
    mail_world.wait_for_messages(rcpt.name, 1, timeout=30)
    mail_world.wait_for_messages(carol.name, 1, folder="Sent", timeout=30)
    log = setup.relayd.log()
    assert carol.password not in log and wrong not in log
    assert setup.relayd.stop() == 0


# -- refusals, without a browser ------------------------------------------------------------


class _Forms(HTMLParser):
    """The hidden fields of each form on a page, by action."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: dict[str, dict[str, str]] = {}
        self._action: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        if tag == "form":
            self._action = found.get("action", "")
            self.forms.setdefault(self._action, {})
        elif tag == "input" and self._action is not None and found.get("type") == "hidden":
            self.forms[self._action][found.get("name", "")] = found.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._action = None


def forms_of(html: str) -> dict[str, dict[str, str]]:
    parser = _Forms()
    parser.feed(html)
    return parser.forms


def owner_session(link: str, ca: Path) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.verify = str(ca)
    return session


def start_sign_in(http: requests.Session, link: str, base: str) -> dict[str, str]:
    page = http.get(link, timeout=30)
    assert page.status_code == 200 and page.url == f"{base}/connect"
    csrf = forms_of(page.text)["/connect/signin"]
    away = http.post(f"{base}/connect/signin", data=csrf, allow_redirects=False, timeout=30)
    assert away.status_code == 303
    return {k: v[0] for k, v in parse_qs(urlsplit(away.headers["Location"]).query).items()}


def test_used_expired_and_unknown_links_forged_state_and_missing_verifier_are_refused(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,
) -> None:
    dave = new_mailbox("webno")
    setup, base = microsoft_web_setup(relayd_setup, mail_world, oauth, dave.address)
    setup.relayd.start()
    ca = mail_world.pki.ca_cert

    # Expired and unknown links.
    expired = connect_link(setup, dave.address, "--expires", "1s")
    time.sleep(1.2)
    answer = requests.get(expired, timeout=30)
    assert answer.status_code == 410 and "expired" in answer.text
    assert answer.headers["Cache-Control"] == "no-store"
    assert "script-src" not in answer.headers["Content-Security-Policy"]
    assert "default-src 'none'" in answer.headers["Content-Security-Policy"]
    unknown = requests.get(f"{base}/connect/{'A' * 43}", timeout=30)
    assert unknown.status_code == 404 and "not valid" in unknown.text

    # A forged state: refused before any code is redeemed; the pending sign-in is gone.
    link = connect_link(setup, dave.address)
    http = owner_session(link, ca)
    asked = start_sign_in(http, link, base)
    assert asked["code_challenge_method"] == "S256" and len(asked["code_challenge"]) == 43
    before = oauth.count("authorization_code")
    forged = http.get(
        f"{base}/connect/callback", params={"code": "x", "state": "forged"}, timeout=30
    )
    assert "its state does not match" in forged.text and "nothing was stored" in forged.text
    again = http.get(
        f"{base}/connect/callback", params={"code": "x", "state": asked["state"]}, timeout=30
    )
    assert "No sign-in was started" in again.text
    assert oauth.count("authorization_code") == before  # nothing was sent to the provider

    # The authorization server refuses a request without PKCE, and a code without its
    # verifier: a code caught on its way back is useless.
    no_pkce = {k: v for k, v in asked.items() if not k.startswith("code_challenge")}
    provider = requests.get(
        oauth.authority("contoso") + "/oauth2/v2.0/authorize",
        params=no_pkce,
        verify=str(ca),
        timeout=30,
    )
    assert provider.status_code == 400 and "PKCE" in provider.text
    asked = start_sign_in(http, link, base)
    consent = requests.post(
        oauth.authority("contoso") + "/oauth2/v2.0/authorize",
        data={**asked, "username": dave.address, "decision": "allow"},
        verify=str(ca),
        allow_redirects=False,
        timeout=30,
    )
    back = consent.headers["Location"]
    code = parse_qs(urlsplit(back).query)["code"][0]
    stolen = requests.post(
        oauth.authority("contoso") + "/oauth2/v2.0/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "client_id": WEB_MS_CLIENT,
            "redirect_uri": asked["redirect_uri"],
        },
        verify=str(ca),
        timeout=30,
    )
    assert stolen.status_code == 400 and stolen.json()["error"] == "invalid_grant"
    assert oauth.state.code_refusals["code_verifier missing"] >= 1
    # The code is spent: relayd's own redemption now fails too, and says so.
    late = http.get(back, timeout=30)
    assert "The provider refused the sign-in" in late.text and "invalid_grant" in late.text
    assert tokens(setup).load(dave.address) is None

    # A used link: connect properly once, then the link is refused.
    asked = start_sign_in(http, link, base)
    consent = requests.post(
        oauth.authority("contoso") + "/oauth2/v2.0/authorize",
        data={**asked, "username": dave.address, "decision": "allow"},
        verify=str(ca),
        allow_redirects=False,
        timeout=30,
    )
    done = http.get(consent.headers["Location"], timeout=30)
    assert "Connected" in done.text
    assert tokens(setup).load(dave.address) is not None
    used = requests.get(link, timeout=30)
    assert used.status_code == 410 and "used already" in used.text
    assert setup.relayd.stop() == 0


def test_operator_page_needs_the_admin_credential_and_the_csrf_token(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,
) -> None:
    erin = new_mailbox("webop")
    setup, base = microsoft_web_setup(relayd_setup, mail_world, oauth, erin.address)
    setup.relayd.start()
    page = f"{base}/operator"
    nobody = requests.get(page, timeout=30)
    assert nobody.status_code == 401 and nobody.headers["WWW-Authenticate"].startswith("Basic")
    wrong = requests.get(page, auth=("ops", "not-it"), timeout=30)
    assert wrong.status_code == 401
    other = requests.get(page, auth=("root", ADMIN_PASSWORD), timeout=30)
    assert other.status_code == 401

    admin = requests.Session()
    admin.trust_env = False
    admin.auth = ("ops", ADMIN_PASSWORD)
    shown = admin.get(page, timeout=30)
    assert shown.status_code == 200 and erin.address in shown.text
    assert shown.headers["Cache-Control"] == "no-store"
    forms = forms_of(shown.text)
    pause = forms["/operator/pause"]
    assert pause["account"] == erin.address and pause["csrf"]

    # The credential alone is not enough: a form without the session's token is refused,
    # and so is one with a token from a page shown to someone else.
    for data in (
        {"account": erin.address},
        {"account": erin.address, "csrf": "guessed"},
    ):
        refused = admin.post(f"{page}/pause", data=data, allow_redirects=False, timeout=30)
        assert refused.status_code == 403
    cross = requests.post(
        f"{page}/pause", data=pause, auth=("ops", ADMIN_PASSWORD), timeout=30
    )  # no session cookie
    assert cross.status_code == 403
    foreign = admin.post(
        f"{page}/pause", data=pause, headers={"Origin": "https://evil.test"}, timeout=30
    )
    assert foreign.status_code == 403
    # Without the credential, the token does nothing either.
    anonymous = requests.post(f"{page}/pause", data=pause, cookies=admin.cookies, timeout=30)
    assert anonymous.status_code == 401
    status: Any = relayd_json(setup.config_path, "status")["accounts"][0]
    assert status["state"] != "paused"

    paused = admin.post(f"{page}/pause", data=pause, timeout=30)
    assert paused.status_code == 200 and "paused" in paused.text
    status = relayd_json(setup.config_path, "status")["accounts"][0]
    assert (status["state"], status["why"]) == ("paused", "paused by the operator")
    release = forms_of(paused.text)["/operator/release"]
    released = admin.post(f"{page}/release", data=release, timeout=30)
    assert released.status_code == 200 and "released" in released.text
    assert relayd_json(setup.config_path, "status")["accounts"][0]["state"] != "paused"

    made = admin.post(f"{page}/link", data=forms_of(released.text)["/operator/link"], timeout=30)
    link = re.search(rf"{re.escape(base)}/connect/[A-Za-z0-9_-]{{43}}", made.text)
    assert link is not None
    assert requests.get(link.group(0), timeout=30).status_code == 200
    assert ADMIN_PASSWORD not in setup.relayd.log()
    # Metrics live on the web listener too.
    metrics = requests.get(f"{base}/metrics", timeout=30)
    assert metrics.status_code == 200 and "relayd_messages_accepted_total" in metrics.text
    assert requests.get(f"{base}/healthz", timeout=30).text == "ok\n"
    assert setup.relayd.stop() == 0
