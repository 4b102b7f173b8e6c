"""The operator-facing services of a running daemon, started and stopped as one.

The control socket (status, queue commands, reload), the submission socket and maildrop
pickup for ``relayd sendmail``, alerts, the metrics endpoint, and systemd's ``STATUS=`` line.
``relayd.daemon`` builds them with what they use and calls ``start`` after the spool is
recovered and the scheduler runs, and ``stop`` before the scheduler drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from relayd import __version__
from relayd.config import ConfigError, load_config
from relayd.config.model import AccountConfig, Config, ListenerConfig
from relayd.core.envelope import Envelope
from relayd.core.outcome import Failure, FailureKind, Reply
from relayd.core.queues import WAITING, Queue
from relayd.core.routing import find_account, known_accounts
from relayd.inbound.handler import InboundHandler
from relayd.inbound.listeners import Listeners, bind_listeners, start_listeners
from relayd.inbound.maildrop import MaildropPickup, prepare_maildrop
from relayd.metrics import DELIVERY_LATENCY, RECIPIENTS, REGISTRY, Sample
from relayd.ops import alerts as alert_texts
from relayd.ops.alerts import ALERT_CLIENT, Alerter
from relayd.ops.control import ControlError, ControlServer, control_socket_path
from relayd.ops.spoolview import QueueCensus
from relayd.queue import commands
from relayd.queue.commands import CommandError
from relayd.queue.events import DeliveryEvents
from relayd.queue.scheduler import Scheduler
from relayd.sdnotify import notify
from relayd.spool.store import Spool
from relayd.sync.filing import FilingEvents
from relayd.tasks import vitals
from relayd.upstream.credentials import CredentialSource

if TYPE_CHECKING:
    from relayd.ops.status import AccountStatus
    from relayd.web.listener import HttpListener
    from relayd.web.service import WebService

__all__ = ["Operations", "OperatorEvents", "submit_socket_listener"]

log = logging.getLogger(__name__)

STATUS_EVERY = 5.0
REMIND_CHECK_EVERY = 300.0


def submit_socket_listener(config: Config) -> ListenerConfig:
    """``<state>/submit.sock``: always open, identity = the peer's uid (SPEC)."""
    return ListenerConfig.local(config.state_directory / "submit.sock", "submit.sock")


class AlertChannel(Protocol):
    """Where alerts go (``relayd.ops.alerts.Alerter``)."""

    def raise_alert(self, alert: alert_texts.Alert, *, cool_down: float = 0.0) -> bool: ...

    def close(self, incident: str) -> None: ...


class OperatorEvents(DeliveryEvents, FilingEvents):
    """What the scheduler and the filing stage report → counters and alerts."""

    def __init__(self, alerter: AlertChannel, config: Callable[[], Config]) -> None:
        self.alerter = alerter
        self.config = config  # the configuration in force

    def alert(self, alert: alert_texts.Alert, *, cool_down: float = 0.0) -> None:
        try:
            self.alerter.raise_alert(alert, cool_down=cool_down)
        except Exception:  # an alert must never break a delivery
            log.exception("cannot raise alert %s", alert.kind)

    def recipient_outcome(self, account: str, status: str, latency: float) -> None:
        RECIPIENTS.inc(account=account, status=status)
        if status == "delivered":
            DELIVERY_LATENCY.observe(max(0.0, latency))

    def account_paused(self, account: AccountConfig, reason: str) -> None:
        self.alert(alert_texts.paused_alert(account, reason))

    def send_as_denied(self, account: AccountConfig, reason: str) -> None:
        self.alert(alert_texts.send_as_alert(account, reason), cool_down=24 * 3600)

    def connection_failed(self, account: AccountConfig, cause: Reply | Failure) -> None:
        # A certificate, a handshake or a STARTTLS no longer offered: never retried in plain
        # text, so a human must look (a STARTTLS that disappears is a downgrade: RFC 3207 §6).
        if isinstance(cause, Failure) and cause.kind in (FailureKind.TLS, FailureKind.NO_STARTTLS):
            self.alert(alert_texts.tls_alert(account, str(cause)))

    def attempt_succeeded(self, account: AccountConfig) -> None:
        self.alerter.close(f"tls:{account.address}")

    def mail_expired(self, envelope: Envelope, recipients: tuple[str, ...]) -> None:
        if envelope.client == ALERT_CLIENT or envelope.is_dsn:
            log.warning(
                "an alert or DSN expired undelivered; no alert about it",
                extra={"queue_id": envelope.queue_id},
            )
            return
        self.alert(alert_texts.expired_alert(envelope, recipients), cool_down=3600)

    def sent_copy_dropped(self, account: str, queue_id: str, reason: str) -> None:
        found = find_account(self.config(), account)
        tenant = found.tenant if found is not None else ""
        self.alert(
            alert_texts.copy_dropped_alert(account, tenant, queue_id, reason), cool_down=3600
        )


class Operations:
    def __init__(
        self,
        *,
        config: Config,
        started_at: float,
        spool: Spool,
        scheduler: Scheduler,
        handler: InboundHandler,
        alerter: Alerter,
        reload: Callable[[], Awaitable[list[str] | None]],
        credentials: CredentialSource,
        credentials_changed: Callable[[], None],
    ) -> None:
        """``reload``: the daemon's reload; True if the new configuration is in force.
        ``credentials``: the daemon's logins, for the web page's test messages;
        ``credentials_changed``: the connect page stored tokens or a password."""
        self.config = config
        self.started_at = started_at
        self.spool = spool
        self.scheduler = scheduler
        self.handler = handler
        self.alerter = alerter
        self.reload = reload
        self.credentials = credentials
        self.credentials_changed = credentials_changed
        self.census = QueueCensus(spool)
        self.control: ControlServer | None = None
        self.submit_listener: Listeners | None = None
        self.pickup: MaildropPickup | None = None
        self.metrics: HttpListener | None = None
        self.web: WebService | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._status = ""
        self._metrics_at: tuple[str, int] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        state = self.config.state_directory
        self.control = ControlServer(control_socket_path(state), self._handlers())
        await self.control.start()
        prepare_maildrop(state)
        self.submit_listener = await start_listeners(
            self.handler, bind_listeners([submit_socket_listener(self.config)])
        )
        self.pickup = MaildropPickup(state, self.handler)
        await self.pickup.scan()  # what waited while the daemon was down, before READY=1
        self.pickup.start()
        self._define_gauges()
        await self._start_metrics()
        await self._start_web()
        self._loop_task = vitals.start("housekeeping", self._housekeeping())

    async def stop(self, timeout: float = 10.0) -> None:
        """Within ``timeout`` (the rest of the daemon's stop deadline)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self.pickup is not None:
            await self.pickup.stop()
        if self.submit_listener is not None:
            await self.submit_listener.close(grace=max(0.0, (deadline - loop.time()) / 2))
        if self.control is not None:
            await self.control.close()
        if self.metrics is not None:
            await self.metrics.close()
        if self.web is not None:
            await self.web.close()
        await self.alerter.drain(timeout=max(0.1, deadline - loop.time()))

    def reloaded(self, config: Config) -> list[str]:
        """The new config in force; returned: what of it waits for the next start."""
        self.config = config
        notes: list[str] = []
        old = self.metrics_address
        new = (config.metrics.address, config.metrics.port) if config.metrics else None
        if old != new:
            notes.append("metrics.address changed: takes effect at the next start")
        if self.web is not None:
            notes.extend(self.web.reloaded(config))
        elif config.web is not None:
            notes.append("web added to the config: the pages open at the next start")
        return notes

    # -- housekeeping: STATUS= and reminders -----------------------------------------------

    def _accounts(self) -> tuple[AccountConfig, ...]:
        """Configured accounts and the senders `domains:` routed that the daemon has seen."""
        return known_accounts(self.config, (h.address for h in self.scheduler.book))

    def _paused_accounts(self) -> dict[str, tuple[AccountConfig, str]]:
        found: dict[str, tuple[AccountConfig, str]] = {}
        for account in self._accounts():
            health = self.scheduler.health(account.address)
            if health.paused:
                found[account.address] = (account, health.reason)
        return found

    async def _housekeeping(self) -> None:
        last_remind = -REMIND_CHECK_EVERY  # the first check right after start
        while True:
            await asyncio.sleep(STATUS_EVERY)
            try:
                self._update_status()
                now = time.monotonic()
                if now - last_remind >= REMIND_CHECK_EVERY:
                    last_remind = now
                    self.alerter.remind_paused(self._paused_accounts())
            except Exception:
                log.exception("housekeeping failed")

    def status_line(self) -> str:
        counts = self.spool.counts()
        queued = sum(counts[q] for q in WAITING)
        paused = sorted(self._paused_accounts())
        text = f"{queued} queued ({counts[Queue.DEFERRED]} deferred, {counts[Queue.HOLD]} held)"
        if paused:
            text += f"; paused: {', '.join(paused)}"
        if vitals.degraded:
            text = f"degraded: {'; '.join(vitals.degraded)}; {text}"
        return text

    def _update_status(self) -> None:
        text = self.status_line()
        if text != self._status:
            self._status = text
            notify(f"STATUS={text}")

    # -- metrics --------------------------------------------------------------------------

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return self._metrics_at if self.metrics is not None else None

    def _define_gauges(self) -> None:
        if self.config.metrics is None and self.config.web is None:
            return
        REGISTRY.gauge(
            "relayd_queue_messages", "Messages in the spool by queue and account", self._depths
        )
        REGISTRY.gauge("relayd_account_paused", "1 while an account is paused", self._paused)
        REGISTRY.gauge(
            "relayd_start_time_seconds",
            "When the daemon started (Unix time)",
            lambda: [({}, self.started_at)],
        )

    async def _start_metrics(self) -> None:
        settings = self.config.metrics
        if settings is None:
            return
        # aiohttp is imported here, after the accepting processes were forked: they never
        # serve HTTP and need not carry it.
        from relayd.web.exposition import metrics_application
        from relayd.web.listener import HttpListener

        self.metrics = HttpListener(
            metrics_application(REGISTRY, self._healthy), settings.address, settings.port
        )
        try:
            await self.metrics.start()
        except OSError as exc:
            # Metrics are an aid: the relay keeps running without them, and says why.
            log.error(
                "metrics: cannot listen on %s:%d: %s",
                settings.address,
                settings.port,
                exc.strerror or exc,
            )
            self.metrics = None
            return
        self._metrics_at = (settings.address, settings.port)
        log.info("metrics on http://%s:%d/metrics", settings.address, settings.port)

    # -- the web pages (relayd.web) ----------------------------------------------------------

    async def _start_web(self) -> None:
        settings = self.config.web
        if settings is None:
            return
        from relayd.web.service import WebService

        self.web = WebService(
            config=self.config,
            scheduler=self.scheduler,
            credentials=self.credentials,
            facts=self._account_facts,
            registry=REGISTRY,
            healthy=self._healthy,
            released=lambda address: self.alerter.close(f"paused:{address}"),
            stored=self.credentials_changed,
        )
        try:
            await self.web.start()
        except (OSError, ssl.SSLError) as exc:
            # Like metrics: mail keeps flowing without the pages, and the log says why.
            log.error("web: cannot listen on %s:%d: %s", settings.address, settings.port, exc)
            self.web = None

    async def _account_facts(self) -> list[AccountStatus]:
        """What ``relayd status`` shows, with this daemon's view of the accounts."""
        from relayd.ops.status import gather

        live = await self._status_command({})
        report = await asyncio.to_thread(gather, self.config, live)
        return report.accounts

    def _depths(self) -> list[Sample]:
        return [
            ({"queue": q.value, "account": a}, float(n))
            for (q, a), n in self.census.count().items()
        ]

    def _paused(self) -> list[Sample]:
        paused = self._paused_accounts()
        return [
            ({"account": a.address}, 1.0 if a.address in paused else 0.0) for a in self._accounts()
        ]

    def _healthy(self) -> tuple[bool, str]:
        if vitals.degraded:
            return False, f"degraded: {'; '.join(vitals.degraded)}"
        if not os.access(self.spool.directory(Queue.INCOMING), os.W_OK):
            return False, "spool not writable"
        return True, "ok"

    # -- control commands -----------------------------------------------------------------

    def _handlers(self) -> dict[str, Callable[[dict[str, Any]], Awaitable[Any]]]:
        return {
            "ping": self._ping,
            "status": self._status_command,
            "reload": self._reload,
            "flush": self._flush,
            "hold": self._hold,
            "release": self._release,
            "delete": self._delete,
        }

    async def _ping(self, args: dict[str, Any]) -> Any:
        return {"version": __version__, "pid": os.getpid()}

    async def _status_command(self, args: dict[str, Any]) -> Any:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "uptime": time.time() - self.started_at,
            "status": self.status_line(),
            "degraded": vitals.degraded,
            "accounts": {
                a.address: self.scheduler.health(a.address).to_dict() for a in self._accounts()
            },
        }

    async def _reload(self, args: dict[str, Any]) -> Any:
        # Checked here first so that the caller sees the errors, not only the log.
        try:
            await asyncio.to_thread(load_config, self.config.source)
        except ConfigError as exc:
            log.error("reload refused, old config still serving:\n%s", exc)
            raise ControlError(f"reload refused, old config still serving:\n{exc}") from None
        restart_needed = await self.reload()
        if restart_needed is None:
            raise ControlError("reload refused, old config still serving (see the daemon's log)")
        return {"config": str(self.config.source), "restart_needed": restart_needed}

    async def _flush(self, args: dict[str, Any]) -> Any:
        queue_id, account = args.get("id"), args.get("account")
        try:
            flushed = commands.flush(
                self.scheduler,
                self.scheduler.book,
                queue_id=str(queue_id) if queue_id is not None else None,
                account=str(account).lower() if account is not None else None,
            )
        except CommandError as exc:
            raise ControlError(str(exc)) from None
        return {"flushed": flushed}

    async def _hold(self, args: dict[str, Any]) -> Any:
        queue_id = str(args.get("id", ""))
        try:
            commands.hold(self.scheduler, queue_id)
        except CommandError as exc:
            raise ControlError(str(exc)) from None
        return {"held": queue_id}

    async def _release(self, args: dict[str, Any]) -> Any:
        account = args.get("account")
        if account is not None:
            address = str(account).lower()
            if find_account(self.config, address) is None:
                raise ControlError(f"{address}: not a configured account")
            released = commands.release_account(self.scheduler, self.scheduler.book, address)
            self.alerter.close(f"paused:{address}")
            log.info(
                "released by the operator (was paused: %s)",
                released.before.paused,
                extra={"account": address},
            )
            return {"released": address, "was_paused": released.before.paused}
        queue_id = str(args.get("id", ""))
        try:
            commands.release(self.scheduler, queue_id)
        except CommandError as exc:
            raise ControlError(str(exc)) from None
        return {"released": queue_id}

    async def _delete(self, args: dict[str, Any]) -> Any:
        queue_id = str(args.get("id", ""))
        try:
            commands.delete(self.scheduler, queue_id)
        except CommandError as exc:
            raise ControlError(str(exc)) from None
        log.info("deleted by the operator", extra={"queue_id": queue_id})
        return {"deleted": queue_id}
