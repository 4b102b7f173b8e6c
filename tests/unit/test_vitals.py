"""Long-lived tasks that die make the daemon say so; per-message disk trouble does not kill
them (relayd.tasks.Vitals, the scheduler's retry timer)."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest
from factories import make_account, make_config, make_envelope, make_tenant, place

import relayd.queue.scheduler as scheduler_module
from relayd.config.model import AccountConfig
from relayd.core.outcome import Verdict
from relayd.core.queues import Queue
from relayd.core.states import RecipientResult
from relayd.queue.arrivals import Inlet
from relayd.queue.scheduler import Scheduler
from relayd.spool.accounts import AccountStore
from relayd.spool.store import Spool
from relayd.tasks import Vitals
from relayd.upstream.dataphase import ContentSource
from relayd.upstream.delivery import AccountSignal, AttemptReport
from relayd.upstream.transport import Transport


async def test_a_task_that_dies_degrades_the_daemon_and_a_cancelled_one_does_not() -> None:
    vitals = Vitals()

    async def dies() -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    async def runs() -> None:
        await asyncio.Event().wait()

    vitals.start("retry timer", dies())
    running = vitals.start("scan", runs())
    await asyncio.sleep(0.01)
    assert vitals.degraded == ["retry timer stopped: OSError(30, 'Read-only file system')"]
    running.cancel()
    await asyncio.sleep(0.01)
    assert len(vitals.degraded) == 1  # cancelling is how tasks are stopped
    vitals.stopping()
    vitals.start("late", dies())
    await asyncio.sleep(0.01)
    assert len(vitals.degraded) == 1  # while stopping, tasks end on purpose


class Delivers:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def new_transport(self, account: AccountConfig) -> Transport:
        raise AssertionError("no probe")

    async def attempt(
        self,
        account: AccountConfig,
        sender: str,
        pending: tuple[str, ...],
        content: ContentSource,
        transport: Transport | None,
        *,
        smtputf8: bool = False,
    ) -> tuple[AttemptReport, Transport | None]:
        self.sent.append(b"".join(content.iter_content()).decode())
        ok = [RecipientResult(r, Verdict.DELIVERED, "2.0.0", "250 2.0.0 ok") for r in pending]
        return AttemptReport(ok, "sink:25", AccountSignal.LOGIN_OK), None


async def test_a_read_only_spool_for_a_while_ends_no_retries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scheduler_module, "MAX_TROUBLE_WAIT", 0.05)
    spool = Spool(tmp_path, fsync=False)
    spool.prepare()
    queued = []
    for i in range(3):
        reception = spool.receive(make_envelope())
        reception.write(b"Subject: %d\r\n\r\nbody\r\n" % i)
        queued.append(await reception.commit())
    place(spool, queued[0], Queue.DEFERRED)  # due at once: no delivery state
    read_only = True
    real_move = spool.move

    def move(queue_id: str, source: Queue, target: Queue) -> None:
        if read_only:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real_move(queue_id, source, target)

    monkeypatch.setattr(spool, "move", move)
    accounts = AccountStore(tmp_path, fsync=False)
    accounts.prepare()
    config = make_config(
        tenants=[make_tenant("acme", accounts=[make_account("alice@acme.example")])]
    )
    deliverer = Delivers()
    scheduler = Scheduler(
        config=config, spool=spool, accounts=accounts, deliverer=deliverer, inlet=Inlet()
    )
    scheduler.start()
    try:
        await asyncio.sleep(0.3)  # several rounds of refusals: deferred and incoming alike
        assert deliverer.sent == []
        assert scheduler._timer_task is not None and not scheduler._timer_task.done()
        read_only = False
        for _ in range(100):
            await asyncio.sleep(0.02)
            if len(deliverer.sent) == 3:
                break
        assert len(deliverer.sent) == 3  # retried and delivered without a restart
        assert spool.list(Queue.INCOMING) == spool.list(Queue.DEFERRED) == []
    finally:
        await scheduler.stop(timeout=1)
