"""The main process's accepting processes: started, watched, replaced, reloaded, stopped.

Several processes accept SMTP on the same listening sockets (bound once, by the main
process, and inherited), so accepting uses every core, while delivery stays scheduled in
the main process alone (SPEC "Delivery"; Postfix's many smtpd and one qmgr). The first ones
are forked before the main process starts its event loop, so they share its memory pages
(PSS counts those once); one that dies is replaced by a fresh interpreter
(``python -m relayd.inbound.worker``) with the same sockets, because forking a process with
a running event loop is not safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import relayd
from relayd.config.model import Config
from relayd.inbound.listeners import BoundListener
from relayd.inbound.worker import SPEC_ENV, WorkerChannels, run_worker
from relayd.queue.arrivals import arrival_channel
from relayd.tasks import TaskSet

__all__ = ["AcceptProcesses", "accept_process_count"]

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0
# A replacement that dies sooner than this after its start makes the next one wait longer.
STABLE_SECONDS = 10.0
MAX_RESPAWN_DELAY = 60.0


def accept_process_count(config: Config) -> int:
    """``accept_processes``, or one per CPU this process may run on, plus one: an accepting
    process waits for the disk at each commit, and one more keeps every CPU busy meanwhile
    (measured on 2 CPUs: about 8% more mail than with 2, for 6 MiB)."""
    if config.accept_processes is not None:
        return config.accept_processes
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, cpus) + 1


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


@dataclass
class _Process:
    pid: int
    index: int  # its number among the accepting processes (a replacement takes it over)
    started: float
    popen: subprocess.Popen[bytes] | None = None  # a replacement, started by exec


class AcceptProcesses:
    def __init__(self, config: Config, bound: list[BoundListener], count: int) -> None:
        self.config = config
        self.count = count
        self.inbox, announcer = arrival_channel()
        parent_alive, self._alive_writer = os.pipe()
        self.channels = WorkerChannels(bound, announcer, parent_alive)
        self._processes: dict[int, _Process] = {}
        self._ready: set[int] = set()
        self._changed = asyncio.Event()
        self._stopping = False
        self._failures = 0  # replacements in a row that did not last
        self._tasks = TaskSet()

    @property
    def pids(self) -> list[int]:
        return sorted(self._processes)

    # -- before the event loop ------------------------------------------------------------

    def fork_all(self) -> None:
        """Fork every accepting process. Call before the main process starts its event loop
        or any thread: a child must not inherit a running loop or a held lock."""
        # Objects alive now are never collected again: a child's garbage collector then
        # leaves the pages it shares with the main process alone (copy-on-write stays cold).
        gc.freeze()
        parent = os.getpid()
        for index in range(self.count):
            pid = os.fork()
            if pid == 0:
                self._child(parent, index)
            self._processes[pid] = _Process(pid, index, time.monotonic())

    def _child(self, parent: int, index: int) -> None:
        code = 1
        try:
            os.close(self._alive_writer)  # only the main process holds it: EOF = it is gone
            self.inbox.close()
            code = run_worker(self.config, self.channels, parent, (index, self.count))
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)

    # -- in the event loop ----------------------------------------------------------------

    async def start(self) -> None:
        """Watch the processes and wait until each one serves; raises RuntimeError if one
        exits first or they take too long."""
        for process in list(self._processes.values()):
            self._watch(process)
        deadline = time.monotonic() + START_TIMEOUT
        while len(self._ready) < self.count:
            if len(self._processes) < self.count:
                raise RuntimeError("an accepting process exited while starting (see above)")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("accepting processes did not start in time")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=left)

    def on_ready(self, pid: int) -> None:
        if pid in self._processes:
            self._ready.add(pid)
            self._changed.set()

    def reload(self) -> None:
        """SIGHUP to each: they re-read the configuration the main process accepted."""
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    async def stop(self, timeout: float) -> None:
        """SIGTERM to each, so they drain (messages in DATA are finished); SIGKILL to what
        is left after ``timeout`` seconds."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self._processes and time.monotonic() < deadline:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=0.5)
            self._poll()
        for pid in self.pids:
            log.warning("accepting process %d did not stop in time; killed", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            self._processes.pop(pid, None)

    def close(self) -> None:
        for fd in (self._alive_writer, self.channels.parent_alive):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.channels.announcer.close()
        self.inbox.close()

    # -- exits and replacements -------------------------------------------------------------

    def _watch(self, process: _Process) -> None:
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(process.pid)
        except (AttributeError, OSError):  # no pidfd (old kernel): the poll task notices
            self._tasks.spawn(self._poll_forever())
            return

        def exited() -> None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
            self._reap(process.pid)

        loop.add_reader(pidfd, exited)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self._poll()

    def _poll(self) -> None:
        for pid in self.pids:
            self._reap(pid)

    def _reap(self, pid: int) -> None:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done, status = pid, 0
        if done == 0:
            return
        process = self._processes.pop(pid, None)
        self._ready.discard(pid)
        self._changed.set()
        if process is None:
            return
        if process.popen is not None:
            process.popen.returncode = status  # reaped here, not by subprocess
        if self._stopping:
            return
        lasted = time.monotonic() - process.started
        self._failures = 0 if lasted >= STABLE_SECONDS else self._failures + 1
        # At once, unless replacements keep dying young: then 2 s, 4 s, ... up to a minute.
        delay = 0.0 if self._failures <= 1 else min(MAX_RESPAWN_DELAY, 2.0 ** (self._failures - 1))
        log.error(
            "accepting process %d %s; starting another in %.0f s",
            pid,
            _describe(status),
            delay,
        )
        self._tasks.spawn(self._replace(process.index, delay))

    async def _replace(self, index: int, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._stopping:
            return
        env = dict(os.environ)
        env[SPEC_ENV] = self.channels.to_spec(self.config.source, (index, self.count))
        # The package as this process imported it, wherever the working directory is.
        package_root = str(Path(relayd.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (package_root, env.get("PYTHONPATH"))))
        try:
            popen = subprocess.Popen(
                [sys.executable, "-m", "relayd.inbound.worker"],
                pass_fds=self.channels.fds(),
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except OSError as exc:
            log.error("cannot start an accepting process: %s", exc)
            self._failures += 1
            retry = self._replace(index, MAX_RESPAWN_DELAY)
            self._tasks.spawn(retry)
            return
        process = _Process(popen.pid, index, time.monotonic(), popen)
        self._processes[popen.pid] = process
        self._watch(process)
        log.info("accepting process %d started", popen.pid)
