"""OAuth2 (XOAUTH2) against the real world: Postfix → Dovecot, which validates every token at
the suite's HTTPS token server (RFC 7662 introspection). msal and google-auth talk to that
server as they would to Microsoft's and Google's; nothing is mocked in between.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mailworld.oauth_server import OAuthServer
from mailworld.world import MailWorld

from relayd.config.model import AccountConfig, Limits, SentCopy, SmtpServer, TlsMode
from relayd.core.outcome import Phase, Reply
from relayd.oauth.store import StoredTokens, TokenStore, new_consent_id
from relayd.oauth.tokens import AccessToken
from relayd.upstream.credentials import Credential, Mechanism
from relayd.upstream.smtp import SmtpSession
from relayd.upstream.transport import AttemptError

from .conftest import NewMailbox, RelaydSetup, RelaydSetupFactory, Webhook
from .ops_cli import relayd_cli, relayd_json, wait_until
from .relayd_proc import ALL_LOGS, REPO, free_port, write_secret
from .test_relay_delivery import message, send, spooled

pytestmark = pytest.mark.integration

MS_CLIENT = "ms-public-client"
GOOGLE_CLIENT = "google-installed-client"
GOOGLE_SECRET = "google-client-secret-123"
APP_CLIENT = "ms-app-client"
APP_SECRET = "ms-app-secret-456"
NO_MAIL: dict[str, list[str]] = {"incoming": [], "active": [], "deferred": [], "hold": []}


@pytest.fixture
def oauth(mail_world: MailWorld) -> Iterator[OAuthServer]:
    server = mail_world.oauth
    server.add_client(MS_CLIENT)
    server.add_client(GOOGLE_CLIENT, GOOGLE_SECRET)
    server.add_app(APP_CLIENT, APP_SECRET, mail_world.domain)
    yield server
    # Leave the shared server as the next test expects it.
    server.fail_status = None
    server.token_size = 48
    server.token_lifetime = 3600
    server.release_refreshes()
    server.start()


def smtp_to(world: MailWorld, tls: str = "starttls") -> dict[str, Any]:
    port = world.smtp_starttls_port if tls == "starttls" else world.smtp_implicit_port
    return {"host": "127.0.0.1", "port": port, "tls": tls, "ca_file": str(world.pki.ca_cert)}


def microsoft_tenant(world: MailWorld, server: OAuthServer, addresses: list[str]) -> dict[str, Any]:
    return {
        "provider": "microsoft365",
        "smtp": smtp_to(world),
        "sent_copy": "never",
        "oauth": {
            "client_id": MS_CLIENT,
            "authority": server.authority("contoso"),
            "ca_file": str(world.pki.ca_cert),
        },
        "accounts": [{"address": a, "oauth": {"flow": "delegated"}} for a in addresses],
    }


def microsoft_setup(
    relayd_setup: RelaydSetupFactory, world: MailWorld, server: OAuthServer, address: str
) -> RelaydSetup:
    """relayd with one Microsoft 365 account, ``address``, which the client may send as."""
    return relayd_setup({"ms": microsoft_tenant(world, server, [address])}, may_send_as=[address])


def google_tenant(
    world: MailWorld, server: OAuthServer, secrets: Path, addresses: list[str]
) -> dict[str, Any]:
    secret = write_secret(secrets / "google-client", GOOGLE_SECRET)
    return {
        "provider": "gmail",
        "smtp": smtp_to(world, "implicit"),
        "sent_copy": "never",
        "oauth": {
            "flow": "delegated",
            "client_id": GOOGLE_CLIENT,
            "client_secret": {"file": str(secret)},
            "token_url": server.google_token_url,
            "authority": server.google_auth_url,
            "ca_file": str(world.pki.ca_cert),
        },
        "accounts": [{"address": a} for a in addresses],
    }


def store_of(setup: RelaydSetup) -> TokenStore:
    return TokenStore(setup.dir / "state", fsync=False)


def seed(
    setup: RelaydSetup,
    server: OAuthServer,
    address: str,
    client_id: str,
    *,
    access_token: str | None = None,
    expires_at: float = 0.0,
) -> str:
    """What `relayd auth` leaves behind, written through the store's API."""
    refresh = server.issue_refresh_token(address, client_id)
    store_of(setup).save(
        StoredTokens(
            address=address,
            flow="delegated",
            refresh_token=refresh,
            access_token=access_token,
            expires_at=expires_at,
            consent_id=new_consent_id(),
            updated_at=time.time(),
        )
    )
    return refresh


def submit(setup: RelaydSetup, sender: str, rcpt: str, subject: str) -> str:
    reply = send(
        setup.port,
        sender,
        [rcpt],
        message(sender, rcpt, subject),
        login=("app", setup.client_password),
    )
    return reply.rsplit(" ", 1)[1]


def start_auth(
    setup: RelaydSetup,
    address: str,
    flag: str,
    *,
    stdin: int = subprocess.DEVNULL,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """``relayd auth ADDRESS FLAG`` as the operator runs it, its output read by the test."""
    return subprocess.Popen(
        [sys.executable, "-m", "relayd", "-c", str(setup.config_path), "auth", address, flag],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=stdin,
        text=True,
        cwd=REPO,
        env=env,
    )


def sasl_logins(world: MailWorld, address: str) -> list[str]:
    return re.findall(
        rf"sasl_method=(\w+), sasl_username={re.escape(address)}", world.postfix_log()
    )


# -- delivery with XOAUTH2 ---------------------------------------------------------------------


def test_microsoft_and_google_accounts_deliver_with_xoauth2(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,
    tmp_path: Path,
) -> None:
    alice, bob, rcpt = new_mailbox("msal"), new_mailbox("gauth"), new_mailbox("rcpt")
    setup = relayd_setup(
        {
            "ms": microsoft_tenant(mail_world, oauth, [alice.address]),
            "g": google_tenant(mail_world, oauth, tmp_path / "secrets", [bob.address]),
        },
        may_send_as=[alice.address, bob.address],
    )
    seed(setup, oauth, alice.address, MS_CLIENT)
    seed(setup, oauth, bob.address, GOOGLE_CLIENT)
    setup.relayd.start()
    submit(setup, alice.address, rcpt.address, "via msal")
    submit(setup, bob.address, rcpt.address, "via google-auth")
    got = mail_world.wait_for_messages(rcpt.name, 2, timeout=30)
    assert {b"Subject: via msal" in m for m in got} == {True, False}
    assert sasl_logins(mail_world, alice.address) == ["XOAUTH2"]
    assert sasl_logins(mail_world, bob.address) == ["XOAUTH2"]
    # Dovecot asked the token server about each token relayd presented: it was checked.
    for user in (alice.address, bob.address):
        [token] = oauth.tokens_of(user)
        assert oauth.introspections(token) >= 1
    assert spooled(setup.dir / "state") == NO_MAIL
    assert setup.relayd.stop() == 0


class _Fixed:
    """A credential source that always offers the same token."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.rejected_tokens: list[str] = []

    async def obtain(self, account: AccountConfig) -> Credential:
        token = AccessToken(self.token, time.time() + 3600)
        return Credential(account.username, self.token, Mechanism.XOAUTH2, token)

    def rejected(self, account: AccountConfig, credential: Credential) -> None:
        self.rejected_tokens.append(credential.secret)


async def test_dovecot_rejects_wrong_and_expired_tokens(
    mail_world: MailWorld, new_mailbox: NewMailbox, oauth: OAuthServer
) -> None:
    alice, other = new_mailbox("checked"), new_mailbox("other")
    server = SmtpServer(
        "127.0.0.1", mail_world.smtp_starttls_port, TlsMode.STARTTLS, mail_world.pki.ca_cert
    )
    account = AccountConfig(
        address=alice.address,
        tenant="t",
        provider="microsoft365",
        username=alice.address,
        password=None,
        oauth=None,
        smtp=server,
        imap=None,
        limits=Limits(),
        sent_copy=SentCopy.NEVER,
        from_name=None,
        aliases=(),
        capture_path=None,
        where="test",
    )
    valid = oauth.issue_access_token(alice.address, MS_CLIENT)
    expired = oauth.issue_access_token(alice.address, MS_CLIENT, lifetime=-60)
    someone_elses = oauth.issue_access_token(other.address, MS_CLIENT)
    for token in ("not-a-token-at-all", expired, someone_elses):
        source = _Fixed(token)
        session = SmtpSession(account, helo_name="relayd.test", credentials=source)
        with pytest.raises(AttemptError) as info:
            await session.open()
        # The refusal arrives as a final reply (the JSON challenge was answered), not as a
        # timeout: the account can be paused rather than retried forever.
        assert info.value.phase is Phase.AUTH
        assert isinstance(info.value.outcome, Reply) and info.value.outcome.code == 535
        assert "status 401" in info.value.outcome.text
        assert source.rejected_tokens == [token]
    session = SmtpSession(account, helo_name="relayd.test", credentials=_Fixed(valid))
    await session.open()
    await session.quit()
    assert oauth.introspections(valid) == 1


def test_app_only_client_credentials_two_mailboxes_of_one_tenant(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,
    tmp_path: Path,
) -> None:
    first, second, rcpt = new_mailbox("appa"), new_mailbox("appb"), new_mailbox("rcpt")
    secret = write_secret(tmp_path / "secrets" / "app", APP_SECRET)
    before = oauth.count("client_credentials")
    setup = relayd_setup(
        {
            "contoso": {
                "provider": "microsoft365",
                "domains": [mail_world.domain],
                "smtp": smtp_to(mail_world),
                "sent_copy": "never",
                "oauth": {
                    "flow": "client_credentials",
                    "client_id": APP_CLIENT,
                    "client_secret": {"file": str(secret)},
                    "authority": oauth.authority("contoso"),
                    "ca_file": str(mail_world.pki.ca_cert),
                },
            }
        },
        may_send_as=[f"*@{mail_world.domain}"],
    )
    setup.relayd.start()
    submit(setup, first.address, rcpt.address, "app-only one")
    submit(setup, second.address, rcpt.address, "app-only two")
    mail_world.wait_for_messages(rcpt.name, 2, timeout=30)
    assert sasl_logins(mail_world, first.address) == ["XOAUTH2"]
    assert sasl_logins(mail_world, second.address) == ["XOAUTH2"]
    # One app token serves both mailboxes.
    assert oauth.count("client_credentials") - before == 1
    assert setup.relayd.stop() == 0


def test_app_only_senders_appear_in_status_and_a_paused_one_gets_its_reminder(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,
    webhook: Webhook,
    tmp_path: Path,
) -> None:
    """Senders routed by `domains:` have no entry in the config, yet each is an account for
    status, metrics and the 24 h reminders. The app may send for the mail world's domain
    only: Dovecot refuses its token for a mailbox of the second domain, so that sender is
    paused (credentials refused twice) while the first delivers."""
    url, posts = webhook
    good, rcpt = new_mailbox("appok"), new_mailbox("rcpt")
    refused = "app@elsewhere.test"
    secret = write_secret(tmp_path / "secrets" / "app", APP_SECRET)
    metrics_port = free_port()
    setup = relayd_setup(
        {
            "contoso": {
                "provider": "microsoft365",
                "domains": [mail_world.domain, "elsewhere.test"],
                "smtp": smtp_to(mail_world),
                "sent_copy": "never",
                "oauth": {
                    "flow": "client_credentials",
                    "client_id": APP_CLIENT,
                    "client_secret": {"file": str(secret)},
                    "authority": oauth.authority("contoso"),
                    "ca_file": str(mail_world.pki.ca_cert),
                },
            }
        },
        may_send_as=[f"*@{mail_world.domain}", "*@elsewhere.test"],
    )
    setup.config["alerts"] = {"webhook": url}
    setup.config["metrics"] = {"address": f"127.0.0.1:{metrics_port}"}
    setup.rewrite_config()
    setup.relayd.start()
    submit(setup, good.address, rcpt.address, "app-only delivered")
    submit(setup, refused, rcpt.address, "app-only held")
    mail_world.wait_for_messages(rcpt.name, 1, timeout=30)
    wait_until(lambda: any(p["kind"] == "account_paused" for p in posts), 60, "the pause alert")
    [paused_post] = [p for p in posts if p["kind"] == "account_paused"]
    assert paused_post["account"] == refused and paused_post["tenant"] == "contoso"

    accounts = {a["address"]: a for a in relayd_json(setup.config_path, "status")["accounts"]}
    assert accounts[good.address]["state"] == "ok"
    assert accounts[good.address]["route"] == (
        f"tenants.contoso.domains: *@{mail_world.domain}, *@elsewhere.test"
    )
    assert accounts[refused]["state"] == "paused" and accounts[refused]["queued"] == 1
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    assert f'relayd_account_paused{{account="{refused}"}} 1.0' in metrics
    assert f'relayd_account_paused{{account="{good.address}"}} 0.0' in metrics
    assert setup.relayd.stop() == 0

    # A day later (the incident's last alert moved back 25 h), the daemon reminds at once.
    incidents_path = setup.dir / "state" / "alerts.json"
    incidents = json.loads(incidents_path.read_text())
    incidents[f"paused:{refused}"]["alerted_at"] -= 25 * 3600
    incidents_path.write_text(json.dumps(incidents))
    setup.relayd.start()
    wait_until(lambda: any(p["kind"] == "account_still_paused" for p in posts), 60, "the reminder")
    [reminder] = [p for p in posts if p["kind"] == "account_still_paused"]
    assert reminder["account"] == refused
    assert not any(p["account"] == good.address for p in posts)
    assert setup.relayd.stop() == 0


def test_token_of_2500_bytes_is_accepted(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,
) -> None:
    alice, rcpt = new_mailbox("bigtok"), new_mailbox("rcpt")
    oauth.token_size = 2500
    setup = microsoft_setup(relayd_setup, mail_world, oauth, alice.address)
    seed(setup, oauth, alice.address, MS_CLIENT)
    setup.relayd.start()
    submit(setup, alice.address, rcpt.address, "big token")
    mail_world.wait_for_messages(rcpt.name, 1, timeout=30)
    [token] = oauth.tokens_of(alice.address)
    # base64 of the XOAUTH2 response is ~3.4 KB: over Postfix's 2048-byte command line, so it
    # can only have passed on its own line after the 334.
    assert len(token) == 2500
    assert sasl_logins(mail_world, alice.address) == ["XOAUTH2"]
    assert setup.relayd.stop() == 0


# -- lifecycle ---------------------------------------------------------------------------------


def test_expiring_token_is_refreshed_once_for_50_queued_messages(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,
) -> None:
    alice, rcpt = new_mailbox("fifty"), new_mailbox("rcpt")
    setup = microsoft_setup(relayd_setup, mail_world, oauth, alice.address)
    # Still valid for 5 minutes (Dovecot would take it), but under the 10-minute margin.
    expiring = oauth.issue_access_token(alice.address, MS_CLIENT, lifetime=300)
    seed(
        setup, oauth, alice.address, MS_CLIENT, access_token=expiring, expires_at=time.time() + 300
    )
    before = oauth.count("refresh_token")
    oauth.hold_refreshes()  # the refresh waits at the server while the 50 queue up
    setup.relayd.start()
    with smtplib.SMTP("127.0.0.1", setup.port, timeout=30) as smtp:
        smtp.login("app", setup.client_password)
        for i in range(50):
            smtp.sendmail(
                alice.address, [rcpt.address], message(alice.address, rcpt.address, f"queued {i}")
            )
    deadline = time.monotonic() + 30
    while oauth.count("refresh_token") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    oauth.release_refreshes()
    mail_world.wait_for_messages(rcpt.name, 50, timeout=90)
    assert oauth.count("refresh_token") - before == 1
    assert oauth.introspections(expiring) == 0  # never presented
    assert setup.relayd.stop() == 0


def test_token_endpoint_5xx_or_down_defers_and_keeps_tokens(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,
) -> None:
    alice, rcpt = new_mailbox("tokdown"), new_mailbox("rcpt")
    setup = microsoft_setup(relayd_setup, mail_world, oauth, alice.address)
    seed(setup, oauth, alice.address, MS_CLIENT)  # no access token: a refresh is needed
    token_file = store_of(setup).path_for(alice.address)
    on_disk = token_file.read_bytes()
    oauth.fail_status = 503
    before = oauth.count("refresh_token")
    setup.relayd.start()
    submit(setup, alice.address, rcpt.address, "waits for the token endpoint")
    setup.relayd.wait_for_log("status=deferred", timeout=30)
    assert oauth.count("refresh_token") > before
    assert token_file.read_bytes() == on_disk
    oauth.stop()  # now unreachable altogether
    log = setup.relayd.wait_for_log("token endpoint unreachable", timeout=30)
    assert "status=held" not in log and "ALERT" not in log
    assert token_file.read_bytes() == on_disk
    assert mail_world.messages(rcpt.name) == []
    oauth.fail_status = None
    oauth.start()
    mail_world.wait_for_messages(rcpt.name, 1, timeout=60)
    assert mail_world.messages(alice.name) == []  # nothing bounced
    stored = store_of(setup).load(alice.address)
    assert stored is not None and stored.access_token  # the new tokens were kept
    assert setup.relayd.stop() == 0


def test_invalid_grant_pauses_then_device_code_consent_releases_held_mail(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,
) -> None:
    alice, rcpt = new_mailbox("revoked"), new_mailbox("rcpt")
    setup = microsoft_setup(relayd_setup, mail_world, oauth, alice.address)
    refresh = seed(setup, oauth, alice.address, MS_CLIENT)
    oauth.revoke(refresh)
    setup.relayd.start()
    held = submit(setup, alice.address, rcpt.address, "held until consent")
    log = setup.relayd.wait_for_log("ALERT account paused", timeout=30)
    assert "invalid_grant" in log and f"relayd auth {alice.address}" in log
    state = setup.dir / "state"
    # The alert is logged as the pause is decided; the move to hold/ follows it.
    wait_until(lambda: spooled(state)["hold"] == [held], 10, "the message in hold/")
    time.sleep(3)  # paused: no more attempts and no second alert
    assert setup.relayd.log().count("ALERT account paused") == 1
    assert mail_world.messages(rcpt.name) == [] and mail_world.messages(alice.name) == []

    # The operator consents again, over "SSH": the device-code flow, end to end.
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    auth = start_auth(setup, alice.address, "--device-code", env=env)
    try:
        shown = ""
        assert auth.stdout is not None
        while "and enter the code" not in shown or not re.search(r"^\s+[A-Z]{8}$", shown, re.M):
            line = auth.stdout.readline()
            assert line, f"relayd auth ended early:\n{shown}"
            shown += line
        assert oauth.url + "/devicelogin" in shown
        code = re.search(r"^\s+([A-Z]{8})$", shown, re.M).group(1)  # type: ignore[union-attr]
        oauth.approve_device_code(code, alice.address)  # the user, in a browser elsewhere
        rest, _ = auth.communicate(timeout=60)
    finally:
        if auth.poll() is None:
            auth.kill()
    assert auth.returncode == 0, shown + rest
    assert "tokens for" in rest and "stored" in rest
    # The running daemon notices the new consent and sends the held mail by itself.
    mail_world.wait_for_messages(rcpt.name, 1, timeout=30)
    assert spooled(state) == NO_MAIL
    assert setup.relayd.log().count("ALERT account paused") == 1
    assert setup.relayd.stop() == 0


# -- the store on disk -------------------------------------------------------------------------


def test_token_file_is_encrypted_and_private(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,
) -> None:
    alice, rcpt = new_mailbox("private"), new_mailbox("rcpt")
    setup = microsoft_setup(relayd_setup, mail_world, oauth, alice.address)
    first_refresh = seed(setup, oauth, alice.address, MS_CLIENT)
    setup.relayd.start()
    submit(setup, alice.address, rcpt.address, "rotate")
    mail_world.wait_for_messages(rcpt.name, 1, timeout=30)
    assert setup.relayd.stop() == 0
    store = store_of(setup)
    record = store.load(alice.address)
    assert record is not None and record.refresh_token != first_refresh  # rotated, saved
    blob = store.path_for(alice.address).read_bytes()
    for secret in (first_refresh, record.refresh_token, record.access_token):
        assert secret is not None
        for form in (secret.encode(), base64.b64encode(secret.encode())):
            assert form not in blob
    state = setup.dir / "state"
    for path, mode in (
        (store.path_for(alice.address), 0o600),
        (state / "tokens", 0o700),
        (state / "keys" / "token.key", 0o600),
        (state / "keys", 0o700),
    ):
        assert path.stat().st_mode & 0o777 == mode, path
    text = setup.relayd.log()
    for secret in (first_refresh, record.refresh_token, record.access_token):
        assert secret is not None
        assert secret not in text


_ROTATOR = """
import sys, time
from pathlib import Path
from relayd.oauth.store import StoredTokens, TokenStore
store = TokenStore(Path(sys.argv[1]))
n = 0
while True:
    n += 1
    store.save(StoredTokens(address="rot@example.test", flow="delegated",
               refresh_token=f"rt-{n}-" + "x" * 2000, access_token=f"at-{n}",
               expires_at=time.time() + 3600, consent_id="c"))
    if n == 1:
        print("ready", flush=True)
"""


def test_killed_during_rotation_leaves_a_usable_token_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    seen: set[int] = set()
    rng = random.Random(7)
    for _ in range(25):
        proc = subprocess.Popen(
            [sys.executable, "-c", _ROTATOR, str(state)],
            stdout=subprocess.PIPE,
            cwd=REPO,
            text=True,
        )
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        time.sleep(rng.uniform(0.0, 0.05))  # somewhere in the middle of rotations
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        store = TokenStore(state)
        record = store.load("rot@example.test")
        assert record is not None
        assert record.refresh_token and record.refresh_token.endswith("x" * 2000)
        seen.add(int(record.refresh_token.split("-")[1]))
        store.remove_stale_temp_files()
        assert [p.name for p in (state / "tokens").iterdir() if p.name.startswith(".tmp")] == []
    assert len(seen) > 1  # the kills did land in different rotations


def google_consent_by_paste(
    setup: RelaydSetup, world: MailWorld, address: str
) -> subprocess.CompletedProcess[str]:
    """``relayd auth ADDRESS --no-browser`` for a Google account, the user's side played out:
    the browser elsewhere signs in (as the server's ``consent_user``, else the login hint)
    and the redirected address is pasted back."""
    auth = start_auth(setup, address, "--no-browser", stdin=subprocess.PIPE)
    try:
        assert auth.stdout is not None and auth.stdin is not None
        shown = ""
        while "Address of the page" not in shown:
            line = auth.stdout.readline()
            assert line, f"relayd auth ended early:\n{shown}"
            shown += line
        url = re.search(r"^\s+(https://\S+)$", shown, re.M).group(1)  # type: ignore[union-attr]
        # The user's browser, elsewhere: the server consents and redirects to 127.0.0.1,
        # which does not load there; the user copies that address.
        ctx = ssl.create_default_context(cafile=str(world.pki.ca_cert))
        parsed = urllib.parse.urlsplit(url)
        assert parsed.hostname is not None, url
        conn = http.client.HTTPSConnection(parsed.hostname, parsed.port, context=ctx)
        conn.request("GET", f"{parsed.path}?{parsed.query}")
        redirected = conn.getresponse().getheader("Location")
        conn.close()
        assert redirected and redirected.startswith("http://127.0.0.1:")
        rest, _ = auth.communicate(redirected + "\n", timeout=60)
    finally:
        if auth.poll() is None:
            auth.kill()
    return subprocess.CompletedProcess(auth.args, auth.returncode, shown + rest)


def test_google_consent_pasted_back_without_a_browser(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,
    tmp_path: Path,
) -> None:
    bob, rcpt = new_mailbox("paste"), new_mailbox("rcpt")
    setup = relayd_setup(
        {"g": google_tenant(mail_world, oauth, tmp_path / "secrets", [bob.address])},
        may_send_as=[bob.address],
    )
    auth = google_consent_by_paste(setup, mail_world, bob.address)
    assert auth.returncode == 0, auth.stdout
    stored = store_of(setup).load(bob.address)
    assert stored is not None and stored.refresh_token
    setup.relayd.start()
    submit(setup, bob.address, rcpt.address, "after pasted consent")
    mail_world.wait_for_messages(rcpt.name, 1, timeout=30)
    assert sasl_logins(mail_world, bob.address) == ["XOAUTH2"]
    assert setup.relayd.stop() == 0


def test_consent_signed_in_as_another_mailbox_stores_nothing(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,
    tmp_path: Path,
) -> None:
    """Google pasted back and Microsoft's device code, each signed in as the wrong mailbox:
    refused with the reason, exit 1, no token file; the right mailbox then succeeds."""
    bob, alice, mallory = new_mailbox("gbob"), new_mailbox("malice"), new_mailbox("mallory")
    google = google_tenant(mail_world, oauth, tmp_path / "secrets", [bob.address])
    microsoft = microsoft_tenant(mail_world, oauth, [alice.address])
    setup = relayd_setup({"g": google, "ms": microsoft}, may_send_as=[bob.address])
    oauth.consent_user = mallory.address
    try:
        wrong = google_consent_by_paste(setup, mail_world, bob.address)
    finally:
        oauth.consent_user = None
    assert wrong.returncode == 1, wrong.stdout
    assert (
        f"error: you signed in as {mallory.address}, not {bob.address}: sign in as {bob.address}"
    ) in wrong.stdout
    assert "nothing was stored" in wrong.stdout
    assert not store_of(setup).path_for(bob.address).exists()
    assert google_consent_by_paste(setup, mail_world, bob.address).returncode == 0
    assert store_of(setup).load(bob.address) is not None

    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    auth = start_auth(setup, alice.address, "--device-code", env=env)
    try:
        assert auth.stdout is not None
        shown = ""
        while not re.search(r"^\s+[A-Z]{8}$", shown, re.M):
            line = auth.stdout.readline()
            assert line, f"relayd auth ended early:\n{shown}"
            shown += line
        code = re.search(r"^\s+([A-Z]{8})$", shown, re.M).group(1)  # type: ignore[union-attr]
        oauth.approve_device_code(code, mallory.address)
        rest, _ = auth.communicate(timeout=60)
    finally:
        if auth.poll() is None:
            auth.kill()
    assert auth.returncode == 1, shown + rest
    assert f"you signed in as {mallory.address}, not {alice.address}" in rest
    assert not store_of(setup).path_for(alice.address).exists()


def test_revoke_deletes_the_tokens_revokes_them_and_holds_the_mail(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,
    tmp_path: Path,
) -> None:
    bob, rcpt = new_mailbox("revoke"), new_mailbox("rcpt")
    tenant = google_tenant(mail_world, oauth, tmp_path / "secrets", [bob.address])
    tenant["oauth"]["revoke_url"] = oauth.revoke_url
    setup = relayd_setup({"g": tenant}, may_send_as=[bob.address])
    assert google_consent_by_paste(setup, mail_world, bob.address).returncode == 0
    stored = store_of(setup).load(bob.address)
    assert stored is not None
    setup.relayd.start()
    submit(setup, bob.address, rcpt.address, "before the revocation")
    mail_world.wait_for_messages(rcpt.name, 1, timeout=30)

    noticed = setup.relayd.log().count("stored tokens or passwords changed")
    revoked = relayd_cli(setup.config_path, "auth", bob.address, "--revoke")
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    assert f"Deleted the stored tokens of {bob.address}" in revoked.stdout
    assert f"Revoked at the provider ({oauth.revoke_url})" in revoked.stdout
    assert oauth.revoked_by_client() == [stored.refresh_token]
    assert not store_of(setup).path_for(bob.address).exists()
    [row] = relayd_json(setup.config_path, "status")["accounts"]
    assert row["state"] == "needs consent" and f"relayd auth {bob.address}" in row["fix"]

    # Once the daemon has noticed (it polls the store every 2 s), its mail is held, not
    # bounced and not sent, even on the session still open from before: paused for want of
    # a consent ...
    setup.relayd.wait_for_log("stored tokens or passwords changed", count=noticed + 1)
    held = submit(setup, bob.address, rcpt.address, "held until a new consent")
    wait_until(lambda: spooled(setup.dir / "state")["hold"] == [held], 30, "the held mail")
    assert len(mail_world.messages(rcpt.name)) == 1
    assert sasl_logins(mail_world, bob.address) == ["XOAUTH2"]  # no login without tokens
    # Said as what it is: relayd has no consent; no server answered 535.
    log = setup.relayd.log()
    assert "no consent from the mailbox owner" in log and " 535" not in log
    # ... until the owner consents again, when it goes out by itself.
    assert google_consent_by_paste(setup, mail_world, bob.address).returncode == 0
    mail_world.wait_for_messages(rcpt.name, 2, timeout=30)
    assert setup.relayd.stop() == 0
    # Revoking twice is no error: there is nothing left to revoke.
    again = relayd_cli(setup.config_path, "auth", bob.address, "--revoke")
    assert again.returncode == 0 and "Deleted" in again.stdout
    assert relayd_cli(setup.config_path, "auth", bob.address, "--revoke").stdout.startswith(
        f"No tokens are stored for {bob.address}"
    )


def test_microsoft_browser_consent_returns_to_the_loopback_address(
    mail_world: MailWorld,
    new_mailbox: NewMailbox,
    relayd_setup: RelaydSetupFactory,
    oauth: OAuthServer,
) -> None:
    alice = new_mailbox("browser")
    setup = microsoft_setup(relayd_setup, mail_world, oauth, alice.address)
    env = dict(os.environ, BROWSER="true")  # the "browser" relayd opens does nothing
    auth = start_auth(setup, alice.address, "--browser", env=env)
    try:
        assert auth.stdout is not None
        shown = ""
        while "forward that port" not in shown:
            line = auth.stdout.readline()
            assert line, f"relayd auth ended early:\n{shown}"
            shown += line
        url = re.search(r"^\s+(https://\S+)$", shown, re.M).group(1)  # type: ignore[union-attr]
        # The user's browser: sign in at the server, follow its redirect to the loopback.
        ctx = ssl.create_default_context(cafile=str(mail_world.pki.ca_cert))
        parsed = urllib.parse.urlsplit(url)
        assert parsed.hostname is not None, url
        conn = http.client.HTTPSConnection(parsed.hostname, parsed.port, context=ctx)
        conn.request("GET", f"{parsed.path}?{parsed.query}")
        back = urllib.parse.urlsplit(conn.getresponse().getheader("Location") or "")
        conn.close()
        assert back.hostname == "localhost"
        loop = http.client.HTTPConnection("127.0.0.1", back.port, timeout=30)
        loop.request("GET", f"{back.path or '/'}?{back.query}")
        assert loop.getresponse().status == 200
        loop.close()
        rest, _ = auth.communicate(timeout=60)
    finally:
        if auth.poll() is None:
            auth.kill()
    assert auth.returncode == 0, shown + rest
    stored = store_of(setup).load(alice.address)
    assert stored is not None and stored.refresh_token in oauth.state.refresh


def test_no_token_of_this_module_in_any_log(mail_world: MailWorld, oauth: OAuthServer) -> None:
    """Every access and refresh token the token server issued in this session: in no relayd
    log, neither raw nor base64 nor as an XOAUTH2 payload."""
    issued = [*oauth.state.access, *oauth.state.refresh]
    assert len(issued) > 10
    texts = {str(p): p.read_text(errors="replace") for p in ALL_LOGS if p.exists()}
    assert texts
    for path, text in texts.items():
        assert "auth=Bearer" not in text, path
        for token in issued:
            assert token not in text, f"{path} contains a token"
            assert base64.b64encode(token.encode()).decode() not in text, path
