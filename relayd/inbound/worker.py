"""An accepting process: SMTP towards clients on the main process's listening sockets.

It does what the SPEC's "SMTP towards clients" asks and nothing else: it routes and checks
each transaction, writes the message to the shared spool (group commit, ``250`` only once
the file and its directory are fsync'd) and announces the queue id to the main process,
which alone schedules delivery (``relayd.queue.arrivals``). Like Postfix's smtpd beside one
qmgr.

It lives as long as the main process: it is told to stop with SIGTERM (listeners closed,
messages in DATA finished, idle sessions told ``421``), it stops the same way when the main
process dies (parent-death signal, and end-of-file on a pipe only the main process writes),
and SIGHUP makes it re-read the configuration (a broken one is refused, the old one serves).

Started by ``fork()`` from the main process (sharing its memory pages), or, to replace one
that died, as ``python -m relayd.inbound.worker`` with the sockets passed by descriptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from relayd.config import ConfigError, load_config
from relayd.config.model import Config
from relayd.inbound.guard import FAILURES_FILE, LoginGuard, SharedFailures
from relayd.inbound.handler import InboundHandler, local_hostnames
from relayd.inbound.listeners import BoundListener, start_listeners
from relayd.log import configure_logging, redactor
from relayd.queue.arrivals import Announcer
from relayd.spool.sealing import spool_key
from relayd.spool.store import Spool

__all__ = ["SPEC_ENV", "WorkerChannels", "run_worker", "serve"]

log = logging.getLogger(__name__)

#: The environment variable that hands a re-executed accepting process its descriptors.
SPEC_ENV = "RELAYD_ACCEPT_SPEC"
# Of the daemon's stop_timeout, what an accepting process leaves the main process at the end.
STOP_MARGIN = 3.0
RESERVED_FILES = 8
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15


@dataclass(frozen=True)
class WorkerChannels:
    """What an accepting process gets from the main process."""

    bound: list[BoundListener]  # the listening sockets, shared
    announcer: socket.socket  # the arrival channel's sending end, shared
    parent_alive: int  # read end of a pipe: end-of-file once the main process is gone

    def to_spec(self, config_path: Path, share: tuple[int, int]) -> str:
        return json.dumps(
            {
                "config": str(config_path),
                "share": list(share),
                "listeners": [
                    [b.config.display, [s.fileno() for s in b.sockets]] for b in self.bound
                ],
                "announcer": self.announcer.fileno(),
                "parent_alive": self.parent_alive,
            }
        )

    def fds(self) -> list[int]:
        found = [s.fileno() for b in self.bound for s in b.sockets]
        return [*found, self.announcer.fileno(), self.parent_alive]


def _prctl(option: int, value: int | bytes) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def _become_worker(parent: int) -> None:
    """Process-level set-up in a new accepting process, before its event loop."""
    # Linux: SIGTERM when the main process dies, so no orphan accepts mail without a
    # scheduler (the pipe watch below covers the moment before this call, and other systems).
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    _prctl(_PR_SET_NAME, b"relayd-accept")
    if os.getppid() != parent:
        os._exit(0)  # the main process is gone already
    # Only the main process speaks to systemd (READY=1, STATUS=, WATCHDOG=1).
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(name, None)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    # A reload before the event loop's handler is in place must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def run_worker(
    config: Config, channels: WorkerChannels, parent: int, share: tuple[int, int] = (0, 1)
) -> int:
    """The whole life of an accepting process; its exit status. ``share``: this process's
    number and how many there are (each reuses its own share of delivered files)."""
    _become_worker(parent)
    try:
        return asyncio.run(serve(config, channels, share))
    except Exception:
        log.exception("accepting process %d failed", os.getpid())
        return 1


async def serve(config: Config, channels: WorkerChannels, share: tuple[int, int] = (0, 1)) -> int:
    loop = asyncio.get_running_loop()
    redactor.set_secrets(config.secret_values())
    announcer = Announcer(channels.announcer)
    # This process only receives: its commits may run on its event loop, and files are
    # reserved in incoming/ ahead of need (relayd.spool.reserved).
    spool = Spool(
        config.state_directory,
        commit_in_loop=True,
        reserved_files=RESERVED_FILES,
        share=share,
        key=spool_key(config.spool),
    )
    if spool.reserved is not None:
        spool.reserved.refill()
    # The main process made the file; every accepting process counts in it.
    failures = SharedFailures(config.state_directory / FAILURES_FILE)
    handler = InboundHandler(
        config=config,
        spool=spool,
        on_queued=announcer.announce,  # with the account: the scheduler need not read the file
        local_hostnames=local_hostnames(config),
        guard=LoginGuard(failures),
    )
    listeners = await start_listeners(handler, channels.bound, owns_paths=False, processes=share[1])
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def reload() -> None:
        try:
            new = load_config(handler.config.source)
        except ConfigError as exc:
            log.error("accepting process %d keeps its configuration:\n%s", os.getpid(), exc)
            return
        if new.state_directory != handler.config.state_directory:
            return  # refused by the main process too, with its reason
        try:
            for note in listeners.reload(new):
                log.debug("%s", note)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.error(
                "accepting process %d keeps its configuration: listener TLS: %s", os.getpid(), exc
            )
            return
        redactor.set_secrets(new.secret_values())
        handler.config = new
        log.debug("accepting process %d: new configuration in use", os.getpid())

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_reader(channels.parent_alive, stop.set)  # readable only at end-of-file
    announcer.ready()
    await stop.wait()
    loop.remove_reader(channels.parent_alive)
    # Sessions in DATA may finish within the daemon's stop deadline, no longer.
    await listeners.close(grace=max(1.0, handler.config.stop_timeout - STOP_MARGIN))
    announcer.flush()
    if spool.reserved is not None:
        spool.reserved.close()
    return 0


def _from_spec(spec: str) -> tuple[Config, WorkerChannels, tuple[int, int]]:
    data = json.loads(spec)
    bound: list[BoundListener] = []
    config = load_config(Path(data["config"]))
    by_display = {listener.display: listener for listener in config.listeners}
    for display, fds in data["listeners"]:
        sockets = [socket.socket(fileno=fd) for fd in fds]
        listener = by_display.get(display)
        if listener is None:
            # Removed from the file since the start: its sockets stay with the main process.
            for sock in sockets:
                sock.detach()
            continue
        bound.append(BoundListener(listener, sockets))
    announcer = socket.socket(fileno=data["announcer"])
    share = (int(data["share"][0]), int(data["share"][1]))
    return config, WorkerChannels(bound, announcer, int(data["parent_alive"])), share


def main() -> int:
    """Entry of a re-executed accepting process (``python -m relayd.inbound.worker``)."""
    spec = os.environ.pop(SPEC_ENV, None)
    if spec is None:
        print("relayd.inbound.worker is started by `relayd run`", file=sys.stderr)
        return 2
    try:
        config, channels, share = _from_spec(spec)
    except ConfigError as exc:
        print(f"accepting process {os.getpid()}: cannot start:\n{exc}", file=sys.stderr)
        return 78  # EX_CONFIG: the main process waits before trying again
    configure_logging(config.log_level)
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return run_worker(config, channels, os.getppid(), share)


if __name__ == "__main__":
    sys.exit(main())
