"""``relayd run``: wiring of listeners, accepting processes, spool, scheduler and signals.

Start order matters for "nothing lost": the spool is recovered (temp files removed,
interrupted deliveries requeued; names only, so a big spool starts fast) before a listening
socket is bound, the accepting processes are forked before the main process's event loop
starts, and READY=1 is sent once every one of them serves. The main process alone schedules
delivery, refreshes tokens, files over IMAP, alerts and serves the control socket.
On SIGTERM the accepting processes drain first, then in-flight deliveries finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
from pathlib import Path
from typing import TYPE_CHECKING

from relayd import __version__
from relayd.config import ConfigError, load_config
from relayd.config.model import AccountConfig, Config
from relayd.core.queues import Queue
from relayd.inbound.guard import LoginGuard, SharedFailures
from relayd.inbound.handler import InboundHandler, local_hostnames
from relayd.inbound.listeners import (
    BoundListener,
    Listeners,
    bind_listeners,
    close_bound,
    start_listeners,
    stop_listeners,
)
from relayd.inbound.processes import AcceptProcesses, accept_process_count
from relayd.log import redactor
from relayd.metrics import ACCEPTED
from relayd.oauth.passwords import PasswordStore, passwords_for
from relayd.oauth.registry import token_sources_for
from relayd.oauth.store import TokenStore
from relayd.ops.alerts import Alerter
from relayd.ops.service import Operations, OperatorEvents

if TYPE_CHECKING:
    from relayd.ops.fleet import FleetService
from relayd.queue.arrivals import ArrivalInbox, Inlet
from relayd.queue.scheduler import Scheduler
from relayd.sdnotify import notify, watchdog_interval
from relayd.spool.accounts import AccountStore
from relayd.spool.sealing import spool_key
from relayd.spool.store import RecoveryReport, Spool
from relayd.sync.connections import ImapConnections
from relayd.sync.filing import FilingStage
from relayd.tasks import TaskSet, vitals
from relayd.upstream.credentials import AccountCredentials
from relayd.upstream.delivery import UpstreamDeliverer

__all__ = ["Daemon", "local_hostnames"]

log = logging.getLogger(__name__)

# What each stage of a stop leaves to the next within the deadline (seconds).
STOP_MARGIN = 1.5
# How often the token store is checked for a new consent written by `relayd auth`. Polling a
# directory listing is cheap, needs no pid file or signal rights (`relayd auth` may run as
# another user than the daemon), and works the same once a control socket exists.
TOKEN_STORE_POLL_SECONDS = 2.0


class Daemon:
    """Every component of the main process, built here with what it uses."""

    def __init__(self, config: Config, *, fsync: bool = True) -> None:
        self.config = config
        self.fsync = fsync
        self.started_at = time.time()
        self.spool = Spool(config.state_directory, fsync=fsync, key=spool_key(config.spool))
        self.accounts = AccountStore(config.state_directory, fsync=fsync)
        self.tokens = token_sources_for(config, fsync=fsync)
        self.token_store = self.tokens.store
        # App passwords given on the web connect page (password: {connect: true}).
        self.passwords = passwords_for(config, fsync=fsync)
        # Whoever puts mail into incoming/ tells the scheduler through here.
        self.inlet = Inlet()
        self.alerter = Alerter(config, self.spool, self.inlet.new_mail)
        # Fleet mode (SPEC "Fleet"): the database driver is imported only then.
        self.fleet: FleetService | None = None
        events: OperatorEvents
        if config.fleet is not None:
            from relayd.ops.fleet import FleetOperatorEvents, FleetService

            self.fleet = FleetService(config.fleet, config.state_directory, self.started_at)
            self.tokens.fleet = self.fleet.tokens
            events = FleetOperatorEvents(self.alerter, lambda: self.config, self.fleet)
        else:
            events = OperatorEvents(self.alerter, lambda: self.config)
        # Sent copies and DSNs over IMAP; OAuth accounts log in with the SMTP token source.
        self.filing = FilingStage(
            config=config,
            spool=self.spool,
            connections=ImapConnections(
                token_source=self._imap_token, password_source=self.passwords.password
            ),
            requeue=self.inlet.requeued,
            events=events,
            fsync=fsync,
        )
        self.credentials = AccountCredentials(self.tokens, self.passwords)
        self.deliverer = UpstreamDeliverer(
            helo_name=config.helo_name, credentials=self.credentials, fsync=fsync
        )
        self.scheduler = Scheduler(
            config=config,
            spool=self.spool,
            accounts=self.accounts,
            deliverer=self.deliverer,
            inlet=self.inlet,
            filing=self.filing,
            events=events,
            consent_of=self._consent_of,
            budget=self.fleet.budgets if self.fleet is not None else None,
            on_health=self.fleet.health_changed if self.fleet is not None else None,
        )
        # Failed client logins, counted by every process that accepts (relayd.inbound.guard).
        config.state_directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.login_failures = SharedFailures.create(config.state_directory)
        self.handler = InboundHandler(
            config=config,
            spool=self.spool,
            on_queued=self._accepted,
            local_hostnames=local_hostnames(config),
            guard=LoginGuard(self.login_failures),
        )
        self._listeners: Listeners | None = None
        self._bound: list[BoundListener] = []
        self.workers: AcceptProcesses | None = None
        self._inbox: ArrivalInbox | None = None
        self._recovery: RecoveryReport | None = None
        self._stop = asyncio.Event()
        self._reloads = TaskSet()
        # Control socket, submit.sock + maildrop, alerts, metrics, the web pages, STATUS=.
        self._stores_seen: object = None  # the token/password stores as last seen
        self.ops = Operations(
            config=config,
            started_at=self.started_at,
            spool=self.spool,
            scheduler=self.scheduler,
            handler=self.handler,
            alerter=self.alerter,
            reload=self.reload,
            credentials=self.credentials,
            credentials_changed=self._credentials_changed,
        )

    def _accepted(self, queue_id: str, account: str | None) -> None:
        """A client's message is durable in incoming/ (accepted here, or announced by an
        accepting process or found by the scan): counted, then queued."""
        if self.scheduler.knows(queue_id):
            return
        ACCEPTED.inc()
        self.inlet.new_mail(queue_id, account)

    def prepare(self, *, fork: bool = True) -> None:
        """Before the event loop: recover the spool, bind the listeners, fork the accepting
        processes (a child never returns from here; ``fork=False``: this process accepts).
        Raises OSError when a listener cannot be bound."""
        redactor.set_secrets(self.config.secret_values())
        self.config.state_directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.accounts.prepare()
        self._recovery = self.spool.recover(check_files=False)
        self.token_store.remove_stale_temp_files()
        self.passwords.store.remove_stale_temp_files()
        self._bound = bind_listeners(self.config.listeners)
        count = accept_process_count(self.config) if fork else 0
        if count > 0:
            # Delivered files are kept for the accepting processes to reuse (Spool.retire).
            self.spool.reuse_files = True
            self.workers = AcceptProcesses(self.config, self._bound, count)
            self.workers.fork_all()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        if self._recovery is None:
            self.prepare(fork=False)  # too late to fork: a loop is running
        report = self._recovery
        assert report is not None
        log.info(
            "relayd %s starting: spool recovered (%d queued, %d requeued from active, "
            "%d temp files removed, %d quarantined)",
            __version__,
            report.queued,
            report.requeued_active,
            report.removed_temp,
            report.quarantined,
        )
        if self.fleet is not None:
            self.fleet.on_consent_changed = self._fleet_consent_changed
            await self.fleet.start(self.scheduler)
        self.scheduler.start()
        self.filing.start()
        token_watch = vitals.start("token store watch", self._watch_token_store())
        try:
            await self._start_accepting()
        except (RuntimeError, OSError, ssl.SSLError, ValueError) as exc:
            log.error("cannot start: %s", exc)
            await self._drain(5.0)
            token_watch.cancel()
            return 1
        await self.ops.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_in_background)
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
        vitals.stopping()
        notify("STOPPING=1")
        await self._drain(self.config.stop_timeout)
        token_watch.cancel()
        if watchdog is not None:
            watchdog.cancel()
        log.info("stopped")
        return 0

    async def _drain(self, stop_timeout: float) -> None:
        """SIGTERM: everything stops together, within one deadline (``stop_timeout``).

        Clients in DATA, deliveries waiting for an upstream's reply and IMAP filings are
        given the same time, not one after another; whatever is still going at the end is
        cut off and stays in the spool (at-least-once): a message cut off in DATA never got
        its 250, an attempt cut off stays in active/ and goes out again after the restart,
        a filing cut off searches the folder before appending again.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + stop_timeout

        def left(margin: float) -> float:
            return max(0.1, deadline - loop.time() - margin)

        log.info("stopping: closing listeners, draining deliveries (at most %.0f s)", stop_timeout)
        await asyncio.gather(
            self._stop_accepting(left(STOP_MARGIN)),
            self.scheduler.stop(timeout=left(2 * STOP_MARGIN)),
            self.filing.stop(timeout=left(2 * STOP_MARGIN)),
        )
        if self.fleet is not None:
            await self.fleet.stop()
        await self.ops.stop(timeout=left(0.5))
        await self.deliverer.aclose()

    async def _start_accepting(self) -> None:
        if self.workers is None:
            self._listeners = await start_listeners(self.handler, self._bound)
            return
        workers = self.workers
        self._inbox = ArrivalInbox(
            workers.inbox,
            self.spool.directory(Queue.INCOMING),
            on_arrival=self._accepted,
            knows=self.scheduler.knows,
            on_ready=workers.on_ready,
        )
        self._inbox.start()
        await workers.start()
        log.info("%d accepting processes: %s", workers.count, " ".join(map(str, workers.pids)))

    def _reload_in_background(self) -> None:
        self._reloads.spawn(self.reload())

    async def _stop_accepting(self, timeout: float) -> None:
        """Within ``timeout``: sessions in DATA finish or are cut off, the accepting
        processes end (killed when they do not)."""
        if self._listeners is not None:
            await stop_listeners(self._listeners, timeout=max(0.1, timeout - STOP_MARGIN))
            self._listeners = None
        if self.workers is not None:
            await self.workers.stop(timeout=timeout)
        if self._inbox is not None:
            await self._inbox.stop()  # what they announced while draining is taken in
        if self.workers is not None:
            self.workers.close()
        close_bound(self._bound)

    def _start_watchdog(self) -> asyncio.Task[None] | None:
        interval = watchdog_interval()
        if interval is None:
            return None

        async def beat() -> None:
            # Sent from the event loop itself: a blocked loop stops the beats and systemd
            # restarts the daemon (sd_watchdog_enabled(3)). So does a long-lived task that
            # died (relayd.tasks.Vitals): a daemon without its retries must not look well.
            while not vitals.degraded:
                notify("WATCHDOG=1")
                await asyncio.sleep(interval)
            log.critical("watchdog pings stopped: %s", "; ".join(vitals.degraded))
            notify(f"STATUS=degraded: {'; '.join(vitals.degraded)}")

        return asyncio.get_running_loop().create_task(beat())

    def _consent_of(self, account: AccountConfig) -> str:
        """The id of the account's consent: its OAuth tokens, or the app password its owner
        gave on the connect page."""
        if account.connect_password:
            return self.passwords.consent_id(account)
        return self.tokens.consent_id(account)

    def _fleet_consent_changed(self) -> None:
        self.tokens.forget()
        self.scheduler.credentials_changed()

    def _stores_snapshot(self) -> tuple[object, ...]:
        return (self.token_store.snapshot(), self.passwords.store.snapshot())

    def _credentials_changed(self, snapshot: object = None) -> None:
        """New or deleted tokens or passwords: drop what was cached and logged in with the
        old ones and give paused accounts their chance. The connect page calls this at once
        (so the page it shows next is true); the watcher for `relayd auth` in a shell."""
        log.info("stored tokens or passwords changed: logging in afresh")
        self.tokens.forget()
        self.scheduler.credentials_changed()
        self._stores_seen = snapshot if snapshot is not None else self._stores_snapshot()

    async def _watch_token_store(self) -> None:
        """A new consent (`relayd auth`, or the web connect page: tokens or an app password)
        resumes a paused account and releases its held mail without a restart: its consent
        id enters the credentials fingerprint."""
        while True:
            try:
                now = await asyncio.to_thread(self._stores_snapshot)
                if self._stores_seen is not None and now != self._stores_seen:
                    self._credentials_changed(now)
                self._stores_seen = now
            except Exception:  # one round's trouble (an unreadable directory, say)
                log.exception("cannot look at the token store; trying again")
            await asyncio.sleep(TOKEN_STORE_POLL_SECONDS)

    async def reload(self) -> list[str] | None:
        """SIGHUP: a broken config is refused and the old one keeps serving (SPEC). Returns
        None when refused, else what of the new config waits for the next start (each also
        logged), for `relayd reload` to print."""
        try:
            config = await asyncio.to_thread(load_config, self.config.source)
        except ConfigError as exc:
            log.error("reload refused, old config still serving:\n%s", exc)
            return None
        if config.state_directory != self.config.state_directory:
            log.error("reload refused: state_directory cannot change while running")
            return None
        restart_needed: list[str] = []
        if config.accept_processes != self.config.accept_processes:
            restart_needed.append("accept_processes changed: takes effect at the next start")
        if (config.spool.encrypt_at_rest, config.spool.key) != (
            self.config.spool.encrypt_at_rest,
            self.config.spool.key,
        ):
            # Every process must seal and open with the same key: all change together.
            restart_needed.append(
                "spool.encrypt_at_rest or spool.key changed: takes effect at the next start"
            )
        if config.fleet != self.config.fleet:
            restart_needed.append("fleet changed: takes effect at the next start")
        try:
            restart_needed.extend(Listeners.check_reload(self._bound, config))
            if self._listeners is not None:
                self._listeners.reload(config)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error("reload refused, old config still serving: listener TLS: %s", exc)
            return None
        redactor.set_secrets(config.secret_values())
        if config.tokens_key != self.config.tokens_key:
            self.token_store = TokenStore(
                config.state_directory, key=config.tokens_key, fsync=self.fsync
            )
            self.tokens.use_store(self.token_store)
            self.passwords.use_store(
                PasswordStore(config.state_directory, key=config.tokens_key, fsync=self.fsync)
            )
        self.config = config
        self.handler.config = config
        self.alerter.config = config
        self.scheduler.set_config(config)
        self.filing.set_config(config)
        restart_needed.extend(self.ops.reloaded(config))
        if self.workers is not None:
            self.workers.reload()  # each re-reads the file the main process just accepted
        for note in restart_needed:
            log.warning("%s", note)
        log.info("configuration reloaded from %s", config.source)
        return restart_needed

    async def _imap_token(self, account: AccountConfig) -> str:
        return (await self.tokens.access_token(account)).value


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
    daemon = Daemon(config)
    try:
        daemon.prepare()  # forks the accepting processes: before any event loop or thread
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return asyncio.run(daemon.run())
