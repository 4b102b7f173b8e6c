"""The operator-facing services of a running daemon, started and stopped as one.

The control socket (status, queue commands, reload), the submission socket and maildrop
pickup for ``relayd sendmail``, alerts, the metrics endpoint, and systemd's ``STATUS=`` line.
``relayd.daemon`` calls ``start`` after the spool is recovered and the scheduler runs, and
``stop`` before the scheduler drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from relayd import __version__
from relayd.config import ConfigError, load_config
from relayd.config.model import AccountConfig, Config, ListenerConfig
from relayd.core.envelope import Envelope
from relayd.core.routing import find_account
from relayd.inbound.listeners import Listeners, start_listeners
from relayd.metrics import (
    ACCEPTED,
    DELIVERY_LATENCY,
    RECIPIENTS,
    REGISTRY,
    Sample,
)
from relayd.ops import alerts as alert_texts
from relayd.ops.alerts import ALERT_CLIENT, Alerter
from relayd.ops.control import ControlError, ControlServer, control_socket_path
from relayd.ops.events import DeliveryEvents, is_tls_failure
from relayd.ops.maildrop import MaildropPickup, prepare_maildrop
from relayd.ops.metrics_http import MetricsServer
from relayd.ops.spoolview import QueueCensus, entries, find_entry
from relayd.sdnotify import notify

if TYPE_CHECKING:
    from relayd.daemon import Daemon

__all__ = ["Operations", "submit_socket_listener"]

log = logging.getLogger(__name__)

STATUS_EVERY = 5.0
REMIND_CHECK_EVERY = 300.0


def submit_socket_listener(config: Config) -> ListenerConfig:
    """``<state>/submit.sock``: always open, identity = the peer's uid (SPEC)."""
    return ListenerConfig.local(config.state_directory / "submit.sock", "submit.sock")


class _Events(DeliveryEvents):
    """The scheduler's events → counters and alerts."""

    def __init__(self, ops: Operations) -> None:
        self.ops = ops

    def recipient_outcome(self, account: str, status: str, latency: float) -> None:
        RECIPIENTS.inc(account=account, status=status)
        if status == "delivered":
            DELIVERY_LATENCY.observe(max(0.0, latency))

    def account_paused(self, account: AccountConfig, reason: str) -> None:
        self.ops.alert(alert_texts.paused_alert(account, reason))

    def send_as_denied(self, account: AccountConfig, reason: str) -> None:
        self.ops.alert(alert_texts.send_as_alert(account, reason), cool_down=24 * 3600)

    def connection_failed(self, account: AccountConfig, detail: str) -> None:
        if is_tls_failure(detail):
            self.ops.alert(alert_texts.tls_alert(account, detail))

    def attempt_succeeded(self, account: AccountConfig) -> None:
        if self.ops.alerter is not None:
            self.ops.alerter.close(f"tls:{account.address}")

    def mail_expired(self, envelope: Envelope, recipients: tuple[str, ...]) -> None:
        if envelope.client == ALERT_CLIENT or envelope.is_dsn:
            log.warning(
                "an alert or DSN expired undelivered; no alert about it",
                extra={"queue_id": envelope.queue_id},
            )
            return
        self.ops.alert(alert_texts.expired_alert(envelope, recipients), cool_down=3600)

    def sent_copy_dropped(self, account: str, queue_id: str, reason: str) -> None:
        found = find_account(self.ops.daemon.config, account)
        tenant = found.tenant if found is not None else ""
        self.ops.alert(
            alert_texts.copy_dropped_alert(account, tenant, queue_id, reason), cool_down=3600
        )


class Operations:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.census = QueueCensus(daemon.spool)
        self.events = _Events(self)
        self.alerter: Alerter | None = None
        self.control: ControlServer | None = None
        self.submit_listener: Listeners | None = None
        self.pickup: MaildropPickup | None = None
        self.metrics: MetricsServer | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._status = ""
        self._metrics_at: tuple[str, int] | None = None

    @property
    def config(self) -> Config:
        return self.daemon.config

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        daemon = self.daemon
        state = self.config.state_directory
        daemon.scheduler.events = self.events
        self.alerter = Alerter(self.config, daemon.spool, daemon.scheduler.submit)
        self._count_accepted()
        self.control = ControlServer(control_socket_path(state), self._handlers())
        await self.control.start()
        prepare_maildrop(state)
        only_submit = dataclasses.replace(
            self.config, listeners=(submit_socket_listener(self.config),)
        )
        self.submit_listener = await start_listeners(only_submit, daemon.handler)
        self.pickup = MaildropPickup(state, daemon.handler)
        await self.pickup.scan()  # what waited while the daemon was down, before READY=1
        self.pickup.start()
        await self._start_metrics()
        self._loop_task = asyncio.get_running_loop().create_task(self._housekeeping())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        if self.pickup is not None:
            await self.pickup.stop()
        if self.submit_listener is not None:
            await self.submit_listener.close(grace=10)
        if self.control is not None:
            await self.control.close()
        if self.metrics is not None:
            await self.metrics.close()
        if self.alerter is not None:
            await self.alerter.drain()

    def reloaded(self, config: Config) -> None:
        if self.alerter is not None:
            self.alerter.config = config
        old = self.metrics_address
        new = (config.metrics.address, config.metrics.port) if config.metrics else None
        if old != new:
            log.warning("metrics.address changed: takes effect at the next start")

    def _count_accepted(self) -> None:
        handler = self.daemon.handler
        submit = handler.on_queued

        def queued(queue_id: str) -> None:
            ACCEPTED.inc()
            submit(queue_id)

        handler.on_queued = queued

    # -- alerts ---------------------------------------------------------------------------

    def alert(self, alert: alert_texts.Alert, *, cool_down: float = 0.0) -> None:
        if self.alerter is None:
            log.error("ALERT %s: %s", alert.kind, alert.summary)
            return
        try:
            self.alerter.raise_alert(alert, cool_down=cool_down)
        except Exception:  # an alert must never break a delivery
            log.exception("cannot raise alert %s", alert.kind)

    def _paused_accounts(self) -> dict[str, tuple[AccountConfig, str]]:
        found: dict[str, tuple[AccountConfig, str]] = {}
        for account in self.config.accounts():
            health = self.daemon.scheduler.health(account.address)
            if health.paused:
                found[account.address] = (account, health.reason)
        return found

    # -- housekeeping: STATUS= and reminders -----------------------------------------------

    async def _housekeeping(self) -> None:
        last_remind = 0.0
        while True:
            await asyncio.sleep(STATUS_EVERY)
            try:
                self._update_status()
                now = time.monotonic()
                if self.alerter is not None and now - last_remind >= REMIND_CHECK_EVERY:
                    last_remind = now
                    self.alerter.remind_paused(self._paused_accounts())
            except Exception:
                log.exception("housekeeping failed")

    def status_line(self) -> str:
        counts = self.daemon.spool.counts()
        queued = sum(counts[q] for q in ("incoming", "active", "deferred", "hold"))
        paused = sorted(self._paused_accounts())
        text = f"{queued} queued ({counts['deferred']} deferred, {counts['hold']} held)"
        if paused:
            text += f"; paused: {', '.join(paused)}"
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

    async def _start_metrics(self) -> None:
        settings = self.config.metrics
        if settings is None:
            return
        REGISTRY.gauge(
            "relayd_queue_messages", "Messages in the spool by queue and account", self._depths
        )
        REGISTRY.gauge("relayd_account_paused", "1 while an account is paused", self._paused)
        REGISTRY.gauge(
            "relayd_start_time_seconds",
            "When the daemon started (Unix time)",
            lambda: [({}, self.daemon.started_at)],
        )
        self.metrics = MetricsServer(REGISTRY, self._healthy)
        try:
            await self.metrics.start(settings.address, settings.port)
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

    def _depths(self) -> list[Sample]:
        return [({"queue": q, "account": a}, float(n)) for (q, a), n in self.census.count().items()]

    def _paused(self) -> list[Sample]:
        paused = self._paused_accounts()
        return [
            ({"account": a.address}, 1.0 if a.address in paused else 0.0)
            for a in self.config.accounts()
        ]

    def _healthy(self) -> tuple[bool, str]:
        if not os.access(self.daemon.spool.root / "incoming", os.W_OK):
            return False, "spool not writable"
        return True, "ok"

    # -- control commands -----------------------------------------------------------------

    def _handlers(self) -> dict[str, Any]:
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
        scheduler = self.daemon.scheduler
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started_at": self.daemon.started_at,
            "uptime": time.time() - self.daemon.started_at,
            "status": self.status_line(),
            "accounts": {
                a.address: scheduler.health(a.address).to_dict() for a in self.config.accounts()
            },
        }

    async def _reload(self, args: dict[str, Any]) -> Any:
        # Checked here first so that the caller sees the errors, not only the log.
        try:
            await asyncio.to_thread(load_config, self.config.source)
        except ConfigError as exc:
            log.error("reload refused, old config still serving:\n%s", exc)
            raise ControlError(f"reload refused, old config still serving:\n{exc}") from None
        before = self.daemon.config
        await self.daemon.reload()
        if self.daemon.config is before:
            raise ControlError("reload refused, old config still serving (see the daemon's log)")
        return {"config": str(self.daemon.config.source)}

    async def _flush(self, args: dict[str, Any]) -> Any:
        scheduler = self.daemon.scheduler
        queue_id, account = args.get("id"), args.get("account")
        if queue_id is None:
            scheduler.retry_unhealthy_now(str(account).lower() if account else None)
        if queue_id is None and account is None:
            count = self.daemon.spool.counts()["deferred"]
            scheduler.flush()
            return {"flushed": count}
        if queue_id is not None:
            if scheduler.where(str(queue_id)) is None:
                raise ControlError(f"{queue_id}: no such message")
            entry = find_entry(self.daemon.spool, str(queue_id))
            if entry is not None:
                scheduler.retry_unhealthy_now(entry.envelope.account)
            return {"flushed": scheduler.flush_messages({str(queue_id)})}
        ids = {e.queue_id for e in entries(self.daemon.spool, ("deferred",), str(account))}
        return {"flushed": scheduler.flush_messages(ids)}

    async def _hold(self, args: dict[str, Any]) -> Any:
        queue_id = str(args.get("id", ""))
        if self.daemon.scheduler.where(queue_id) is None:
            raise ControlError(f"{queue_id}: no such message")
        if not self.daemon.scheduler.hold_message(queue_id):
            raise ControlError(f"{queue_id}: being delivered right now; try again")
        return {"held": queue_id}

    async def _release(self, args: dict[str, Any]) -> Any:
        scheduler = self.daemon.scheduler
        account = args.get("account")
        if account is not None:
            address = str(account).lower()
            if find_account(self.config, address) is None:
                raise ControlError(f"{address}: not a configured account")
            was_paused = scheduler.health(address).paused
            scheduler.release_account(address)
            if self.alerter is not None:
                self.alerter.close(f"paused:{address}")
            log.info(
                "released by the operator (was paused: %s)", was_paused, extra={"account": address}
            )
            return {"released": address, "was_paused": was_paused}
        queue_id = str(args.get("id", ""))
        if scheduler.where(queue_id) != "hold":
            raise ControlError(f"{queue_id}: not held")
        scheduler.release_message(queue_id)
        return {"released": queue_id}

    async def _delete(self, args: dict[str, Any]) -> Any:
        queue_id = str(args.get("id", ""))
        if self.daemon.scheduler.where(queue_id) is None:
            raise ControlError(f"{queue_id}: no such message")
        if not self.daemon.scheduler.delete_message(queue_id):
            raise ControlError(f"{queue_id}: being delivered right now; try again")
        log.info("deleted by the operator", extra={"queue_id": queue_id})
        return {"deleted": queue_id}
