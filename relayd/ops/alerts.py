"""Alerts: an operator hears about what needs a human, once per incident, never a storm.

Channels (SPEC ``alerts:``): always the log; an email to ``alerts.email`` sent through the
account named by ``alerts.via`` (spooled like any message, so it survives restarts and
waits out an outage); a JSON POST to ``alerts.webhook``. A tenant may have its own
``alerts:`` too: alerts about its accounts go to the top-level channels and to its own. An
alert email about an account is only sent when ``via`` belongs to the same tenant: relayd
never sends news about a tenant through another tenant's mailbox (SPEC "What it is"); such
alerts go to the log and the webhook.

Incidents are keyed (``paused:<account>``, ``tls:<account>`` ...) and remembered in
``<state>/alerts.json``, so a restart does not repeat them. A paused account gets a reminder
every 24 h; event-like incidents (expired mail, a refused sender, a dropped Sent copy) are
quiet for a cool-down after their alert. Above ``MAX_PER_HOUR`` alerts in an hour only the
log speaks, so a mass failure cannot flood the alert mailbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

from relayd.config.model import AccountConfig, AlertsConfig, Config
from relayd.core.envelope import Envelope
from relayd.core.routing import find_account
from relayd.metrics import ALERTS
from relayd.spool.store import Spool, new_queue_id
from relayd.tasks import TaskSet

__all__ = ["ALERT_CLIENT", "Alert", "Alerter", "IncidentBook"]

log = logging.getLogger(__name__)

#: The client name on relayd's own alert emails: their failures raise no further alert mail.
ALERT_CLIENT = "relayd-alerts"
REMIND_EVERY = 24 * 3600.0
MAX_PER_HOUR = 20
WEBHOOK_TIMEOUT = 10.0


@dataclass(frozen=True)
class Alert:
    kind: str  # account_paused, account_still_paused, mail_expired, tls_failed, ...
    account: str
    tenant: str
    summary: str  # one line: the email's subject
    detail: str  # what happened and what to do
    incident: str  # alerts with the same open incident are not repeated


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class IncidentBook:
    """Open incidents: key → {"opened_at", "alerted_at", "until"} (until: cool-down end)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._open: dict[str, dict[str, float]] = {}
        with contextlib.suppress(OSError, ValueError, TypeError):
            data = json.loads(path.read_bytes())
            if isinstance(data, dict):
                self._open = {str(k): dict(v) for k, v in data.items()}

    def is_open(self, key: str, now: float) -> bool:
        entry = self._open.get(key)
        if entry is None:
            return False
        until = entry.get("until", 0.0)
        if until and now >= until:
            del self._open[key]
            self._save()
            return False
        return True

    def open(self, key: str, now: float, cool_down: float = 0.0) -> None:
        self._open[key] = {
            "opened_at": now,
            "alerted_at": now,
            "until": now + cool_down if cool_down else 0.0,
        }
        self._save()

    def alerted(self, key: str, now: float) -> None:
        if key in self._open:
            self._open[key]["alerted_at"] = now
            self._save()

    def last_alert(self, key: str) -> float | None:
        entry = self._open.get(key)
        return entry.get("alerted_at") if entry else None

    def close(self, key: str) -> None:
        if self._open.pop(key, None) is not None:
            self._save()

    def keys(self, prefix: str) -> list[str]:
        return [k for k in self._open if k.startswith(prefix)]

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, json.dumps(self._open, sort_keys=True).encode())
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
        except OSError as exc:  # alerting goes on; at worst one repeat after a restart
            log.warning("cannot save alert incidents: %s", exc)


def post_json(url: str, payload: dict[str, Any], timeout: float = WEBHOOK_TIMEOUT) -> int:
    """Blocking JSON POST (run it in a thread); the HTTP status."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "User-Agent": "relayd"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return int(response.status)


class Alerter:
    def __init__(
        self,
        config: Config,
        spool: Spool,
        enqueue: Callable[[str, str | None], None],
        *,
        clock: Callable[[], float] = time.time,
        post: Callable[[str, dict[str, Any]], int] = post_json,
    ) -> None:
        self.config = config
        self.spool = spool
        self.enqueue = enqueue  # hands a spooled alert email to the scheduler
        self.clock = clock
        self.post = post
        self.book = IncidentBook(config.state_directory / "alerts.json")
        self._recent: deque[float] = deque()
        self._suppressed = 0
        self._tasks = TaskSet()

    # -- raising --------------------------------------------------------------------------

    def raise_alert(self, alert: Alert, *, cool_down: float = 0.0) -> bool:
        """Log it and send it on its channels, unless its incident is already open."""
        now = self.clock()
        if self.book.is_open(alert.incident, now):
            return False
        self.book.open(alert.incident, now, cool_down)
        self._send(alert, now)
        return True

    def close(self, incident: str) -> None:
        self.book.close(incident)

    def remind_paused(self, paused: dict[str, tuple[AccountConfig, str]]) -> None:
        """Reminders for paused accounts (every 24 h); incidents of resumed accounts end."""
        now = self.clock()
        for key in self.book.keys("paused:"):
            address = key.removeprefix("paused:")
            if address not in paused:
                self.book.close(key)
                continue
            last = self.book.last_alert(key) or 0.0
            if now - last >= REMIND_EVERY:
                account, reason = paused[address]
                self.book.alerted(key, now)
                self._send(paused_alert(account, reason, reminder=True), now)

    def _send(self, alert: Alert, now: float) -> None:
        ALERTS.inc(kind=alert.kind)
        log.error("ALERT %s: %s", alert.kind, alert.summary, extra={"account": alert.account})
        while self._recent and self._recent[0] <= now - 3600:
            self._recent.popleft()
        if len(self._recent) >= MAX_PER_HOUR:
            self._suppressed += 1
            log.warning(
                "alert storm: %d alerts this hour; this one goes to the log only",
                len(self._recent) + self._suppressed,
            )
            return
        self._recent.append(now)
        if self._suppressed:
            alert = Alert(
                alert.kind,
                alert.account,
                alert.tenant,
                alert.summary,
                f"{alert.detail}\n\n({self._suppressed} earlier alerts went to the log only: "
                "too many in one hour.)",
                alert.incident,
            )
            self._suppressed = 0
        self._spawn(self._deliver(alert, now))

    def _spawn(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            try:
                await work
            except Exception:
                log.exception("alert delivery failed")

        self._tasks.spawn(run())

    async def drain(self, timeout: float = WEBHOOK_TIMEOUT + 2) -> None:
        await self._tasks.drain(timeout)

    # -- channels -------------------------------------------------------------------------

    async def _deliver(self, alert: Alert, now: float) -> None:
        emails: set[tuple[str, str]] = set()
        webhooks: set[str] = set()
        for channels in self._channels(alert):
            if channels.email and channels.via and (channels.via, channels.email) not in emails:
                emails.add((channels.via, channels.email))
                await self._email(alert, channels.via, channels.email, now)
            if channels.webhook and channels.webhook.reveal() not in webhooks:
                webhooks.add(channels.webhook.reveal())
                await self._webhook(alert, channels.webhook.reveal(), now)

    def _channels(self, alert: Alert) -> list[AlertsConfig]:
        """The top-level channels, then those of the alert's tenant (its own admin)."""
        found = [self.config.alerts] if self.config.alerts else []
        for tenant in self.config.tenants:
            if tenant.name == alert.tenant and tenant.alerts is not None:
                found.append(tenant.alerts)
        return found

    def _email_refusal(self, alert: Alert, via: AccountConfig) -> str | None:
        if alert.tenant and alert.tenant != via.tenant:
            return (
                f"alerts.via {via.address} belongs to tenant {via.tenant}, and relayd sends no "
                f"news about tenant {alert.tenant} through it"
            )
        if alert.account == via.address and alert.kind.startswith("account_"):
            return f"alerts.via {via.address} is itself paused"
        return None

    async def _email(self, alert: Alert, via_address: str, to: str, now: float) -> None:
        via = find_account(self.config, via_address)
        if via is None:
            log.error("alert email not sent: alerts.via %s is not configured", via_address)
            return
        refusal = self._email_refusal(alert, via)
        if refusal is not None:
            log.warning("alert email not sent: %s (log and webhook only)", refusal)
            return
        content = compose_email(alert, via_address, to, self.config.helo_name, now)
        envelope = Envelope(
            queue_id=new_queue_id(),
            received_at=now,
            client=ALERT_CLIENT,
            peer="local",
            sender=via_address,
            recipients=(to,),
            account=via.address,
            tenant=via.tenant,
        )
        reception = self.spool.receive(envelope)
        try:
            reception.write(content)
        except OSError:
            reception.abort()
            raise
        queue_id = await reception.commit()
        log.info("alert email to <%s> queued", to, extra={"queue_id": queue_id})
        self.enqueue(queue_id, envelope.account)

    async def _webhook(self, alert: Alert, url: str, now: float) -> None:
        payload = {
            **{k: v for k, v in asdict(alert).items() if k != "incident"},
            "host": self.config.helo_name,
            "time": datetime.fromtimestamp(now, UTC).isoformat(),
        }
        try:
            status = await asyncio.to_thread(self.post, url, payload)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            log.warning("alert webhook failed: %s", getattr(exc, "reason", exc))
            return
        log.info("alert webhook answered %d", status)


def compose_email(alert: Alert, sender: str, to: str, host: str, now: float) -> bytes:
    subject = _one_line(alert.summary).encode("ascii", "replace").decode()
    when = datetime.fromtimestamp(now, UTC)
    head = (
        f"From: relayd <{sender}>\r\nTo: <{to}>\r\nSubject: [relayd] {subject}\r\n"
        f"Date: {format_datetime(when)}\r\nMessage-ID: {make_msgid('alert', host)}\r\n"
        "Auto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    )
    body = f"{alert.detail}\n\nAccount: {alert.account}\nHost: {host}\nTime: {when.isoformat()}\n"
    return head.encode() + body.replace("\r\n", "\n").replace("\n", "\r\n").encode()


# -- the alerts relayd raises ---------------------------------------------------------------


def paused_alert(account: AccountConfig, reason: str, *, reminder: bool = False) -> Alert:
    what = "is still paused" if reminder else "paused"
    return Alert(
        kind="account_still_paused" if reminder else "account_paused",
        account=account.address,
        tenant=account.tenant,
        summary=f"account {account.address} {what}: credentials refused",
        detail=(
            f"The provider refused the credentials of {account.address} twice in a row:\n"
            f"  {_one_line(reason, 400)}\n\nIts mail is kept in the spool (held, not bounced). "
            "Fix the password or token, then run `relayd reload` (or `relayd auth` for OAuth, "
            f"or `relayd queue release --account {account.address}`)."
        ),
        incident=f"paused:{account.address}",
    )


def tls_alert(account: AccountConfig, detail: str) -> Alert:
    server = f"{account.smtp.host}:{account.smtp.port}" if account.smtp else "its upstream"
    return Alert(
        kind="tls_failed",
        account=account.address,
        tenant=account.tenant,
        summary=f"TLS to {server} failed for {account.address}",
        detail=(
            f"relayd could not set up verified TLS with {server}: {_one_line(detail, 400)}\n\n"
            "Mail for the account is deferred, never sent without TLS. Check the server's "
            "certificate, the account's smtp.tls (465: implicit, 587: starttls) and ca_file; "
            "`relayd test ADDRESS` shows what works."
        ),
        incident=f"tls:{account.address}",
    )


def expired_alert(envelope: Envelope, recipients: tuple[str, ...]) -> Alert:
    return Alert(
        kind="mail_expired",
        account=envelope.account,
        tenant=envelope.tenant,
        summary=f"mail from {envelope.sender} expired undelivered",
        detail=(
            f"Message {envelope.queue_id} from {envelope.sender} could not be delivered to "
            f"{', '.join(recipients)} before spool.retry.give_up_after; the sender got a "
            "non-delivery notice. Further expiries for this account in the next hour are only "
            "logged."
        ),
        incident=f"expired:{envelope.account}",
    )


def send_as_alert(account: AccountConfig, reason: str) -> Alert:
    return Alert(
        kind="send_as_denied",
        account=account.address,
        tenant=account.tenant,
        summary=f"{account.address} may not send as a sender address",
        detail=(
            f"The provider refused a sender address for {account.address}: "
            f"{_one_line(reason, 400)}\n\nThe message was bounced to its sender. Grant the "
            "mailbox 'Send As' rights on the address, or add it to the account's aliases "
            "only once the provider allows it."
        ),
        incident=f"sendas:{account.address}",
    )


def copy_dropped_alert(account: str, tenant: str, queue_id: str, reason: str) -> Alert:
    return Alert(
        kind="sent_copy_dropped",
        account=account,
        tenant=tenant,
        summary=f"Sent copy for {account} dropped",
        detail=(
            f"The copy of message {queue_id} for the Sent folder of {account} could not be "
            f"filed before give_up_after: {_one_line(reason, 400)}\nThe message itself was "
            "delivered. Check the account's imap settings with `relayd test ADDRESS`."
        ),
        incident=f"copy:{account}",
    )
