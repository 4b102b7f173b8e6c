"""``relayd run``: wiring of listeners, spool, scheduler and signals.

Start order matters for "nothing lost": the spool is recovered (temp files removed, corrupt
files quarantined, interrupted deliveries requeued) before the first listener opens and before
READY=1 is sent; on SIGTERM the listeners close first, then in-flight deliveries finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import ssl
import time
from pathlib import Path

from relayd import __version__
from relayd.config import ConfigError, load_config
from relayd.config.model import Config
from relayd.inbound.handler import InboundHandler
from relayd.inbound.listeners import Listeners, start_listeners, stop_listeners
from relayd.log import redactor
from relayd.sdnotify import notify, watchdog_interval
from relayd.secrets_index import all_secret_values
from relayd.spool.accounts import AccountStore
from relayd.spool.scheduler import Scheduler
from relayd.spool.store import Spool
from relayd.upstream.credentials import credentials_for
from relayd.upstream.delivery import Deliverer

__all__ = ["Daemon", "local_hostnames"]

log = logging.getLogger(__name__)

DRAIN_SECONDS = 30.0


def not_yet_served(config: Config) -> list[str]:
    """Configured features this version does not act on yet: said at start, never silent."""
    notes: list[str] = []
    if config.metrics is not None:
        notes.append("metrics: the /metrics endpoint is not served by this version")
    if config.alerts is not None and (config.alerts.email or config.alerts.webhook):
        notes.append("alerts: email/webhook delivery is not available yet; alerts are logged")
    for tenant in config.tenants:
        accounts = [*tenant.accounts, *([tenant.domain_account] if tenant.domain_account else [])]
        if any(a.oauth is not None and a.password is None for a in accounts):
            notes.append(
                f"tenants.{tenant.name}: OAuth2 login is not available yet; mail for its "
                "OAuth accounts is accepted and waits in the spool (deferred)"
            )
    return notes


def local_hostnames(config: Config) -> frozenset[str]:
    """Names under which local senders like ``root@<this host>`` are rewritten (SPEC rule 2)."""
    names = {"localhost", "localhost.localdomain", socket.gethostname(), socket.getfqdn()}
    if config.helo_name:
        names.add(config.helo_name)
    return frozenset(n.lower() for n in names if n)


class Daemon:
    def __init__(self, config: Config, *, fsync: bool = True) -> None:
        self.config = config
        self.fsync = fsync
        self.started_at = time.time()
        self.spool = Spool(config.state_directory, fsync=fsync)
        self.accounts = AccountStore(config.state_directory, fsync=fsync)
        self.deliverer = Deliverer(
            helo_name=config.helo_name, credentials=credentials_for, fsync=fsync
        )
        self.scheduler = Scheduler(
            config=config, spool=self.spool, accounts=self.accounts, deliverer=self.deliverer
        )
        self.handler = InboundHandler(
            config=config,
            spool=self.spool,
            on_queued=self.scheduler.submit,
            local_hostnames=local_hostnames(config),
        )
        self._listeners: Listeners | None = None
        self._stop = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        redactor.set_secrets(all_secret_values(self.config))
        self.config.state_directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.accounts.prepare()
        report = await asyncio.to_thread(self.spool.recover)
        log.info(
            "relayd %s starting: spool recovered (%d queued, %d requeued from active, "
            "%d temp files removed, %d quarantined)",
            __version__,
            report.queued,
            report.requeued_active,
            report.removed_temp,
            report.quarantined,
        )
        for note in not_yet_served(self.config):
            log.warning("%s", note)
        self.scheduler.start()
        self._listeners = await start_listeners(self.config, self.handler)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        for listener in self.config.listeners:
            log.info(
                "listening on %s (auth %s, tls %s)",
                listener.display,
                listener.auth.value,
                listener.tls.value,
            )
        notify("READY=1", f"STATUS=accepting; {report.queued} messages queued")
        watchdog = self._start_watchdog()
        await self._stop.wait()
        notify("STOPPING=1")
        log.info("stopping: closing listeners, draining deliveries")
        if self._listeners is not None:
            await stop_listeners(self._listeners, timeout=DRAIN_SECONDS)
        await self.scheduler.stop(timeout=DRAIN_SECONDS)
        if watchdog is not None:
            watchdog.cancel()
        log.info("stopped")
        return 0

    def _start_watchdog(self) -> asyncio.Task[None] | None:
        interval = watchdog_interval()
        if interval is None:
            return None

        async def beat() -> None:
            # Sent from the event loop itself: a blocked loop stops the beats and systemd
            # restarts the daemon (reliability.md case 24).
            while True:
                notify("WATCHDOG=1")
                await asyncio.sleep(interval)

        return asyncio.get_running_loop().create_task(beat())

    async def reload(self) -> None:
        """SIGHUP: a broken config is refused and the old one keeps serving (SPEC)."""
        try:
            config = await asyncio.to_thread(load_config, self.config.source)
        except ConfigError as exc:
            log.error("reload refused, old config still serving:\n%s", exc)
            return
        if config.state_directory != self.config.state_directory:
            log.error("reload refused: state_directory cannot change while running")
            return
        if self._listeners is not None:
            try:
                notes = self._listeners.reload(config)
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.error("reload refused, old config still serving: listener TLS: %s", exc)
                return
            for note in notes:
                log.warning("%s", note)
        redactor.set_secrets(all_secret_values(config))
        self.config = config
        self.handler.config = config
        self.scheduler.set_config(config)
        log.info("configuration reloaded from %s", config.source)

    def request_stop(self) -> None:
        self._stop.set()


def run_daemon(config_path: Path) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        log.error("cannot start:\n%s", exc)
        return 2
    for warning in config.warnings:
        log.warning("%s", warning)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(Daemon(config).run())
