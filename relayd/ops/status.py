"""``relayd status``: per account state, last success and error, queued mail, Sent-copy
backlog; the daemon's version, uptime and the spool's size.

Everything but the uptime is on disk (account health, the spool), so the report works with
the daemon stopped; when it runs, its in-memory view of the accounts is asked over the
control socket and wins.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from relayd import __version__
from relayd.config.model import AccountConfig, Config
from relayd.core.health import AccountHealth, AccountState
from relayd.core.hints import hint_for
from relayd.core.queues import WAITING, Queue
from relayd.core.sentcopy import awaits_filing
from relayd.ops.spoolview import spool_bytes
from relayd.spool.accounts import AccountStore
from relayd.spool.sealing import spool_key
from relayd.spool.store import Spool

__all__ = ["AccountStatus", "StatusReport", "gather", "render_table"]


@dataclass(frozen=True)
class AccountStatus:
    address: str
    tenant: str
    state: str  # ok | deferred | unhealthy | paused | needs consent | not connected
    why: str
    fix: str
    last_success_at: float | None
    last_error_at: float | None
    last_error: str
    queued: int
    sent_copy_backlog: int


@dataclass(frozen=True)
class StatusReport:
    version: str
    running: bool
    pid: int | None
    uptime: float | None
    spool_messages: int
    spool_bytes: int
    queues: dict[str, int]
    accounts: list[AccountStatus]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _needs_consent(account: AccountConfig, config: Config, health: AccountHealth) -> bool:
    """A delegated OAuth account without stored tokens, or whose grant was refused."""
    if account.oauth is None or account.password is not None:
        return False
    if "relayd auth" in health.reason or "invalid_grant" in health.reason:
        return True
    if account.oauth.flow not in ("delegated", "refresh_token"):
        return False
    if account.oauth.flow == "refresh_token" and account.oauth.refresh_token is not None:
        return False
    tokens = config.state_directory / "tokens"
    try:
        from relayd.oauth.store import TokenStore

        return (
            not TokenStore(config.state_directory, key=config.tokens_key)
            .path_for(account.address)
            .exists()
        )
    except ImportError:  # no token store in this build: judge by the directory alone
        return not tokens.is_dir()


def _not_connected(account: AccountConfig, config: Config) -> bool:
    """``password: {connect: true}`` and no password given on the connect page yet."""
    if not account.connect_password:
        return False
    from relayd.oauth.passwords import PasswordStore

    return (
        not PasswordStore(config.state_directory, key=config.tokens_key)
        .path_for(account.address)
        .exists()
    )


def _account_status(
    account: AccountConfig,
    config: Config,
    health: AccountHealth,
    queued: int,
    backlog: int,
) -> AccountStatus:
    state, why, fix = health.state.value, health.reason, ""
    if health.operator_paused:
        fix = (
            "release it on the web operator page, or "
            f"`relayd queue release --account {account.address}`"
        )
    elif _not_connected(account, config):
        state = "not connected"
        why = "no app password given on the connect page yet"
        fix = f"send the mailbox owner a link: `relayd connect {account.address}`"
    elif _needs_consent(account, config, health):
        state = "needs consent"
        why = why or "no OAuth2 tokens stored for this account yet"
        fix = f"run `relayd auth {account.address}`"
    elif health.state is AccountState.PAUSED:
        fix = hint_for(health.reason) or ""
        fix = (fix + " " if fix else "") + (
            f"After fixing: `relayd reload`, or `relayd queue release --account {account.address}`."
        )
    elif health.state is AccountState.OK:
        why = ""
    return AccountStatus(
        address=account.address,
        tenant=account.tenant,
        state=state,
        why=why,
        fix=fix,
        last_success_at=health.last_success_at,
        last_error_at=health.last_error_at,
        last_error=health.last_error,
        queued=queued,
        sent_copy_backlog=backlog,
    )


def _scan_spool(spool: Spool) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(messages per queue, awaiting delivery per account, awaiting a Sent copy per account).

    A message whose delivery state carries a filing job (relayd.core.sentcopy) was delivered
    and only waits for its Sent copy, in whichever queue the Sent-copy step keeps it."""
    counts = spool.counts()
    queued: dict[str, int] = {}
    backlog: dict[str, int] = {}
    for queue in counts:
        if queue is Queue.CORRUPT:
            continue
        for name in os.listdir(spool.directory(queue)):
            try:
                envelope = spool.load(name, queue).envelope
            except OSError:  # moved on meanwhile, or unreadable: not this report's business
                continue
            state = spool.read_state(name)
            target = backlog if awaits_filing(state) else queued
            if target is queued and queue not in WAITING:
                continue
            target[envelope.account] = target.get(envelope.account, 0) + 1
    return {q.value: n for q, n in counts.items()}, queued, backlog


def gather(config: Config, live: dict[str, Any] | None) -> StatusReport:
    """The report; ``live`` is the daemon's answer to ``status``, None when it is not running."""
    spool = Spool(config.state_directory, fsync=False, key=spool_key(config.spool))
    if spool.directory(Queue.INCOMING).is_dir():
        queues, queued, backlog = _scan_spool(spool)
    else:
        queues, queued, backlog = {}, {}, {}
    on_disk = AccountStore(config.state_directory).load_all()
    live_accounts: dict[str, Any] = (live or {}).get("accounts", {})
    accounts: list[AccountStatus] = []
    for account in config.accounts():
        if account.address in live_accounts:
            health = AccountHealth.from_dict(live_accounts[account.address])
        else:
            health = on_disk.get(account.address, AccountHealth(address=account.address))
        accounts.append(
            _account_status(
                account,
                config,
                health,
                queued.get(account.address, 0),
                backlog.get(account.address, 0),
            )
        )
    return StatusReport(
        version=str((live or {}).get("version", __version__)),
        running=live is not None,
        pid=(live or {}).get("pid"),
        uptime=(live or {}).get("uptime"),
        spool_messages=sum(n for q, n in queues.items() if q != Queue.CORRUPT.value),
        spool_bytes=spool_bytes(spool.root) if spool.root.is_dir() else 0,
        queues=queues,
        accounts=accounts,
    )


# -- rendering --------------------------------------------------------------------------------


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _short(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def render_table(report: StatusReport, now: float | None = None) -> str:
    del now
    if report.running:
        head = (
            f"relayd {report.version}: running (pid {report.pid}), "
            f"up {_duration(report.uptime or 0)}"
        )
    else:
        head = f"relayd {report.version}: not running"
    held = report.queues.get(Queue.HOLD.value, 0)
    deferred = report.queues.get(Queue.DEFERRED.value, 0)
    lines = [
        head,
        f"spool: {report.spool_messages} messages ({deferred} deferred, {held} held), "
        f"{_size(report.spool_bytes)}",
        "",
    ]
    rows = [("ACCOUNT", "STATE", "LAST SUCCESS", "LAST ERROR", "QUEUED", "SENT-COPY")]
    for a in report.accounts:
        state = a.state if not a.why or a.state == "ok" else f"{a.state}: {_short(a.why, 40)}"
        error = (
            "-"
            if a.last_error_at is None
            else (f"{_when(a.last_error_at)} {_short(a.last_error, 36)}")
        )
        rows.append(
            (
                a.address,
                state,
                _when(a.last_success_at),
                error,
                str(a.queued),
                str(a.sent_copy_backlog),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    for a in report.accounts:
        if a.fix:
            lines.append(f"  {a.address}: {a.fix}")
    if not report.accounts:
        lines.append("(no accounts configured)")
    return "\n".join(lines) + "\n"
