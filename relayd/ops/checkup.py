"""``relayd test ADDRESS [--send-to ADDR]``: "Test & connect", one step at a time.

DNS, TCP, TLS (version, certificate subject), EHLO, login, an optional real message, then
IMAP login and the Sent folder. A step that fails says why, with a hint for the replies
providers are known for (``relayd.ops.hints``); when the configured port/TLS pair does not
work, the other standard pairs are tried and the one that works is named (users mix up
465 = implicit and 587 = STARTTLS). Login and sending go through the same session code as
the daemon's deliveries, so a passing test means the daemon can deliver.

Secrets never appear: a password is shown as a fixed row of dots, whatever its length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid
from typing import Any
from urllib.parse import urlsplit

import aiosmtplib

from relayd.config import load_for_command
from relayd.config.apis import TRANSPORT_LABELS
from relayd.config.model import AccountConfig, Config, TlsMode
from relayd.core.hints import hint_for
from relayd.core.routing import find_account
from relayd.oauth.passwords import passwords_for
from relayd.oauth.registry import token_sources_for
from relayd.tls import client_context
from relayd.upstream.credentials import AccountCredentials
from relayd.upstream.dataphase import BytesContent
from relayd.upstream.delivery import UpstreamDeliverer
from relayd.upstream.transport import AttemptError

__all__ = ["DOTS", "add_test_arguments", "cmd_test", "run_checkup"]

DOTS = "••••••••"
STEP_TIMEOUT = 8.0
STANDARD_PAIRS = ((465, TlsMode.IMPLICIT), (587, TlsMode.STARTTLS))


@dataclass
class Probe:
    ok: bool
    failed_step: str = ""
    why: str = ""
    tls_version: str = ""
    subject: str = ""


class Report:
    """The steps as they happen: printed one per line, or (``--json``) kept and printed as
    one document at the end, for scripts and for the web page's "test & connect"."""

    def __init__(self, *, as_json: bool = False) -> None:
        self.failed = False
        self.as_json = as_json
        self.steps: list[dict[str, str | bool]] = []
        self.notes: list[str] = []

    def line(self, text: str) -> None:
        if self.as_json:
            self.notes.append(text.strip())
        else:
            print(text, flush=True)

    def ok(self, step: str, text: str) -> None:
        self.steps.append({"step": step, "ok": True, "detail": text})
        if not self.as_json:
            print(f"  [ok]   {step:<6} {text}", flush=True)

    def fail(self, step: str, text: str) -> None:
        self.failed = True
        hint = hint_for(text) or ""
        self.steps.append({"step": step, "ok": False, "detail": text, "hint": hint})
        if not self.as_json:
            print(f"  [FAIL] {step:<6} {text}", flush=True)
            if hint:
                print(f"         hint: {hint}", flush=True)

    def document(self, account: AccountConfig) -> dict[str, Any]:
        return {
            "account": account.address,
            "tenant": account.tenant,
            "provider": account.provider,
            "ok": not self.failed,
            "steps": self.steps,
            "notes": self.notes,
        }


def _subject(cert: dict[str, Any] | None) -> str:
    if not cert:
        return "?"
    parts = [f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
    return ", ".join(parts) or "?"


def _tls_error(exc: BaseException) -> str | None:
    seen: BaseException | None = exc
    for _ in range(6):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"certificate not trusted: {seen.verify_message}"
        if isinstance(seen, ssl.SSLError):
            return f"TLS handshake failed: {seen.reason or seen}"
        seen = seen.__cause__ or seen.__context__
    return None


async def probe(
    host: str, port: int, tls: TlsMode, ca_file: str | None, helo: str, report: Report | None
) -> Probe:
    """TCP, TLS and EHLO with one port/TLS pair; prints the steps when ``report`` is given."""

    def ok(step: str, text: str) -> None:
        if report is not None:
            report.ok(step, text)

    started = time.monotonic()
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), STEP_TIMEOUT)
        writer.close()
    except (OSError, TimeoutError) as exc:
        return Probe(False, "TCP", f"cannot connect to {host}:{port}: {exc or 'timed out'}")
    ok("TCP", f"{host}:{port} connected in {(time.monotonic() - started) * 1000:.0f} ms")
    context = client_context(ca_file) if tls is not TlsMode.NONE else None
    smtp = aiosmtplib.SMTP(
        hostname=host,
        port=port,
        local_hostname=helo,
        use_tls=tls is TlsMode.IMPLICIT,
        start_tls=False,
        tls_context=context,
        timeout=STEP_TIMEOUT,
    )
    step = "TLS" if tls is TlsMode.IMPLICIT else "EHLO"
    try:
        await smtp.connect()
        if tls is TlsMode.STARTTLS:
            await smtp.ehlo()
            if not smtp.supports_extension("starttls"):
                return Probe(False, "TLS", "the server does not offer STARTTLS on this port")
            step = "TLS"
            await smtp.starttls(tls_context=context)
        result = Probe(True)
        ssl_object = smtp.get_transport_info("ssl_object")
        if ssl_object is not None:
            result.tls_version = str(ssl_object.version())
            result.subject = _subject(ssl_object.getpeercert())
            ok("TLS", f"{result.tls_version}, certificate subject {result.subject}")
        step = "EHLO"
        await smtp.ehlo()
        auth = " ".join(sorted(smtp.server_auth_methods)) or "none offered"
        ok("EHLO", f"{(smtp.server_auth_methods and 'AUTH ') or ''}{auth}")
        return result
    except (aiosmtplib.SMTPException, OSError, TimeoutError, ssl.SSLError) as exc:
        tls_problem = _tls_error(exc)
        if tls_problem is not None:
            return Probe(False, "TLS", tls_problem)
        if isinstance(exc, (TimeoutError, aiosmtplib.SMTPTimeoutError)):
            why = "no answer (timed out)"
            if tls is not TlsMode.IMPLICIT:
                why += ": a server waiting for a TLS handshake says nothing first"
            return Probe(False, step, why)
        return Probe(False, step, str(exc) or type(exc).__name__)
    finally:
        smtp.close()


async def _alternatives(account: AccountConfig, helo: str, report: Report) -> None:
    assert account.smtp is not None
    server = account.smtp
    ca = str(server.ca_file) if server.ca_file else None
    other = TlsMode.IMPLICIT if server.tls is not TlsMode.IMPLICIT else TlsMode.STARTTLS
    tried = {(server.port, server.tls)}
    for port, tls in ((server.port, other), *STANDARD_PAIRS):
        if (port, tls) in tried:
            continue
        tried.add((port, tls))
        result = await probe(server.host, port, tls, ca, helo, None)
        if result.ok:
            report.line(
                f"  -> port {port} needs tls: {tls.value} (that works: {result.tls_version}, "
                f"certificate subject {result.subject}); set smtp: {{port: {port}, "
                f"tls: {tls.value}}}"
            )
            return
    report.line("  -> none of the standard port/TLS pairs works on this host either")


def _credential_text(account: AccountConfig) -> str:
    if account.password is not None:
        return f"password {DOTS} ({account.password.source})"
    if account.connect_password:
        return f"password {DOTS} (given on the connect page)"
    if account.oauth is not None:
        return f"OAuth2 ({account.oauth.flow})"
    return "no credentials"


def _test_message(account: AccountConfig, to: str, helo: str) -> bytes:
    now = format_datetime(datetime.now(UTC))
    return (
        f"From: <{account.address}>\r\nTo: <{to}>\r\nSubject: relayd test message\r\n"
        f"Date: {now}\r\nMessage-ID: {make_msgid('relayd-test', helo)}\r\n"
        "Auto-Submitted: auto-generated\r\n\r\n"
        f"This message was sent by `relayd test {account.address}` on {helo}.\r\n"
    ).encode()


async def _api_checkup(
    config: Config, account: AccountConfig, send_to: str | None, report: Report
) -> int:
    """An account sending through Graph or the Gmail API: the API host, an access token with
    the API's scopes, the optional test message; no IMAP (the service files the Sent copy)."""
    assert account.api_url is not None and account.oauth is not None
    label = TRANSPORT_LABELS[account.transport]
    report.line(f"transport {account.transport.value}: {label} at {account.api_url}")
    host = urlsplit(account.api_url).hostname or ""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, 443, type=socket.SOCK_STREAM), STEP_TIMEOUT
        )
        report.ok("DNS", f"{host} -> {', '.join(sorted({str(i[4][0]) for i in infos}))}")
    except (OSError, TimeoutError) as exc:
        report.fail("DNS", f"{host}: {exc or 'timed out'}")
        return 1
    deliverer = UpstreamDeliverer(
        helo_name=config.helo_name,
        credentials=AccountCredentials(token_sources_for(config), passwords_for(config)),
    )
    transport = deliverer.new_transport(account)
    scopes = " ".join(account.oauth.scopes)
    try:
        try:
            await transport.open()
        except AttemptError as err:
            report.fail("token", f"{err.outcome}")
            return 1
        report.ok("token", f"OAuth2 {account.oauth.flow}, scopes {scopes}")
        if send_to:
            message = _test_message(account, send_to, config.helo_name)
            try:
                result = await transport.send(account.address, (send_to,), BytesContent(message))
            except AttemptError as err:
                report.fail("send", f"test message to <{send_to}>: {err.outcome}")
            else:
                _phase, reply = result.replies[send_to]
                if reply.code == 250:
                    report.ok("send", f"test message to <{send_to}>: {reply}")
                else:
                    report.fail("send", f"test message to <{send_to}>: {reply}")
    finally:
        await transport.quit()
        await deliverer.aclose()
    report.line(f"Sent copies: filed by {label} itself (no IMAP)")
    report.line("result: " + ("FAILED" if report.failed else "all steps passed"))
    return 1 if report.failed else 0


async def _smtp_login_and_send(
    config: Config, account: AccountConfig, send_to: str | None, report: Report
) -> None:
    # The daemon's own credentials code: the app password, or the stored OAuth tokens.
    deliverer = UpstreamDeliverer(
        helo_name=config.helo_name,
        credentials=AccountCredentials(token_sources_for(config), passwords_for(config)),
    )
    session = deliverer.new_transport(account)
    try:
        await session.open()
    except AttemptError as err:
        report.fail("login", f"as {account.username}: {err.outcome}")
        return
    report.ok("login", f"as {account.username}")
    try:
        if send_to:
            message = _test_message(account, send_to, config.helo_name)
            result = await session.send(account.address, (send_to,), BytesContent(message))
            _phase, reply = result.replies[send_to]
            if reply.code == 250:
                report.ok("send", f"test message to <{send_to}>: {reply}")
            else:
                report.fail("send", f"test message to <{send_to}>: {reply}")
    except AttemptError as err:
        report.fail("send", f"test message to <{send_to}>: {err.outcome}")
    finally:
        await session.quit()


async def _imap(config: Config, account: AccountConfig, report: Report) -> None:
    imap = account.imap
    if imap is None:
        report.line("IMAP: not configured (no Sent copies for this account)")
        return
    report.line(f"IMAP {imap.host}:{imap.port}, tls: {imap.tls.value}")
    from relayd.sync.imap import ImapError, ImapSession

    token_source = None
    if account.oauth is not None and (imap.password is None and account.password is None):
        tokens = token_sources_for(config)

        async def token_source(acc: AccountConfig) -> str:
            return (await tokens.access_token(acc)).value

    session = ImapSession(
        account, token_source=token_source, password_source=passwords_for(config).password
    )
    try:
        await session.open()
        report.ok("login", f"as {imap.username or account.username}")
        if imap.sent_folder:
            names = {entry.display_name for entry in await session.list_mailboxes()}
            if imap.sent_folder in names:
                report.ok("Sent", f"folder {imap.sent_folder!r} exists")
            else:
                report.fail("Sent", f"no folder {imap.sent_folder!r} (imap.sent_folder)")
        else:
            report.ok("Sent", f"\\Sent special-use folder: {await session.find_sent_folder()}")
    except ImapError as exc:
        report.fail("IMAP", f"{exc.kind.value}: {exc.detail}")
    finally:
        await session.logout()


async def run_checkup(
    config: Config, address: str, send_to: str | None, *, as_json: bool = False
) -> int:
    report = Report(as_json=as_json)
    account = find_account(config, address)
    if account is None:
        print(f"error: {address} is not an account (or alias) in {config.source}", file=sys.stderr)
        return 1
    code = await _checkup(config, account, send_to, report)
    if as_json:
        print(json.dumps(report.document(account), indent=2))
    return code


async def _checkup(
    config: Config, account: AccountConfig, send_to: str | None, report: Report
) -> int:
    report.line(
        f"account {account.address} (tenant {account.tenant}, provider "
        f"{account.provider}); login {account.username}, {_credential_text(account)}"
    )
    if account.is_capture or account.smtp is None:
        path = account.capture_path
        report.line(f"capture provider: mail stays in the Maildir {path}; nothing to connect to")
        return 0
    if account.transport.is_http_api:
        return await _api_checkup(config, account, send_to, report)
    server = account.smtp
    report.line(f"SMTP {server.host}:{server.port}, tls: {server.tls.value}")
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM), STEP_TIMEOUT
        )
        addresses = sorted({str(info[4][0]) for info in infos})
        report.ok("DNS", f"{server.host} -> {', '.join(addresses)}")
    except (OSError, TimeoutError) as exc:
        report.fail("DNS", f"{server.host}: {exc or 'timed out'}")
        return 1
    ca = str(server.ca_file) if server.ca_file else None
    result = await probe(server.host, server.port, server.tls, ca, config.helo_name, report)
    if not result.ok:
        report.fail(result.failed_step, result.why)
        await _alternatives(account, config.helo_name, report)
    else:
        await _smtp_login_and_send(config, account, send_to, report)
    await _imap(config, account, report)
    report.line("result: " + ("FAILED" if report.failed else "all steps passed"))
    return 1 if report.failed else 0


def add_test_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("address", help="the account (or alias) to test")
    parser.add_argument("--send-to", metavar="ADDR", help="also send a real test message")
    parser.add_argument("--json", action="store_true", help="print the steps as one JSON document")


def cmd_test(args: argparse.Namespace) -> int:
    """Test & connect: DNS, TCP, TLS, EHLO, login, test message, IMAP; exit 0 if all worked."""
    config = load_for_command(getattr(args, "config", None))
    if config is None:
        return 2
    from relayd.log import configure_logging, redactor

    # Library warnings go to stderr through the same redaction as the daemon's log.
    configure_logging("warning")
    redactor.set_secrets(config.secret_values())
    return asyncio.run(run_checkup(config, args.address, args.send_to, as_json=args.json))
