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
from relayd.config.model import AccountConfig, Config, TenantConfig
from relayd.core.health import AccountHealth, AccountState
from relayd.core.hints import hint_for
from relayd.core.queues import WAITING, Queue
from relayd.core.routing import known_accounts
from relayd.core.sentcopy import job_of
from relayd.ops.spoolview import spool_bytes
from relayd.spool.accounts import AccountStore
from relayd.spool.sealing import spool_key
from relayd.spool.store import Spool

__all__ = ["AccountStatus", "DomainRoute", "StatusReport", "gather", "render_table"]


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
    sent_copy_error: str  # why the oldest waiting Sent copy is not filed yet
    route: str  # "" for a configured account, else the `domains:` route that sends it


@dataclass(frozen=True)
class DomainRoute:
    """A tenant's `domains:`: every matching sender goes out through it."""

    tenant: str
    domains: list[str]
    provider: str
    sends_by: str  # how: app-only OAuth, a service account, a capture Maildir ...
    senders_seen: int


@dataclass(frozen=True)
class StatusReport:
    version: str
    running: bool
    degraded: list[str]  # why the running daemon is degraded (relayd.tasks.Vitals)
    pid: int | None
    uptime: float | None
    spool_messages: int
    spool_bytes: int
    queues: dict[str, int]
    accounts: list[AccountStatus]
    routes: list[DomainRoute]
    # Fleet mode: every host's queue per account and the fleet's pauses (None: no fleet).
    fleet: dict[str, Any] | None = None

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


def _sends_by(account: AccountConfig) -> str:
    if account.is_capture:
        return f"capture into the Maildir {account.capture_path}"
    where = f"{account.smtp.host}:{account.smtp.port}" if account.smtp is not None else ""
    if account.oauth is not None:
        how = {
            "client_credentials": "app-only OAuth2",
            "service_account": "a service account (domain-wide delegation)",
        }.get(account.oauth.flow, f"OAuth2 ({account.oauth.flow})")
    else:
        how = "a shared login"
    return f"{how} via {where}" if where else how


def _domain_route(tenant: TenantConfig, accounts: list[AccountStatus]) -> DomainRoute | None:
    if tenant.domain_account is None or not tenant.domains:
        return None
    return DomainRoute(
        tenant=tenant.name,
        domains=[p.text for p in tenant.domains],
        provider=tenant.provider,
        sends_by=_sends_by(tenant.domain_account),
        senders_seen=sum(1 for a in accounts if a.route and a.tenant == tenant.name),
    )


def _route_of(account: AccountConfig, config: Config) -> str:
    """The `domains:` route an account comes from, "" when it is configured by address."""
    if any(account.address == a.address for a in config.accounts()):
        return ""
    for tenant in config.tenants:
        if tenant.name == account.tenant:
            return f"tenants.{tenant.name}.domains: {', '.join(p.text for p in tenant.domains)}"
    return ""


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
    copy_error: str,
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
    elif health.needs_admin:
        # The reason names the permission and the admin step; nothing in relayd changes.
        fix = f"Once granted: `relayd queue release --account {account.address}`."
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
        sent_copy_error=copy_error,
        route=_route_of(account, config),
    )


@dataclass
class _SpoolScan:
    queues: dict[str, int]
    queued: dict[str, int]  # awaiting delivery, per account
    backlog: dict[str, int]  # delivered, awaiting the Sent copy, per account
    copy_errors: dict[str, tuple[int, str]]  # per account: (attempts, last error) of the worst


def _scan_spool(spool: Spool) -> _SpoolScan:
    """Messages per queue, and per account what waits for delivery and for a Sent copy.

    A message whose delivery state carries a filing job (relayd.core.sentcopy) was delivered
    and only waits for its Sent copy, in whichever queue the Sent-copy step keeps it; the
    job that failed most often tells why copies are not filed (no \\Sent folder, IMAP login
    refused ...), as SPEC asks of `status`."""
    scan = _SpoolScan({}, {}, {}, {})
    if not spool.directory(Queue.INCOMING).is_dir():
        return scan
    counts = spool.counts()
    for queue in counts:
        if queue is Queue.CORRUPT:
            continue
        for name in os.listdir(spool.directory(queue)):
            try:
                envelope = spool.load(name, queue).envelope
            except OSError:  # moved on meanwhile, or unreadable: not this report's business
                continue
            state = spool.read_state(name)
            account = envelope.account
            job = job_of(state)
            if job is not None:
                scan.backlog[account] = scan.backlog.get(account, 0) + 1
                worst = scan.copy_errors.get(account, (0, ""))
                if job.last_error and job.attempts > worst[0]:
                    scan.copy_errors[account] = (job.attempts, job.last_error)
            elif queue in WAITING:
                scan.queued[account] = scan.queued.get(account, 0) + 1
    scan.queues = {q.value: n for q, n in counts.items()}
    return scan


def gather(config: Config, live: dict[str, Any] | None) -> StatusReport:
    """The report; ``live`` is the daemon's answer to ``status``, None when it is not running."""
    spool = Spool(config.state_directory, fsync=False, key=spool_key(config.spool))
    scan = _scan_spool(spool)
    on_disk = AccountStore(config.state_directory).load_all()
    live_accounts: dict[str, Any] = (live or {}).get("accounts", {})
    seen = {*on_disk, *live_accounts, *scan.queued, *scan.backlog}
    accounts: list[AccountStatus] = []
    for account in known_accounts(config, seen):
        if account.address in live_accounts:
            health = AccountHealth.from_dict(live_accounts[account.address])
        else:
            health = on_disk.get(account.address, AccountHealth(address=account.address))
        accounts.append(
            _account_status(
                account,
                config,
                health,
                scan.queued.get(account.address, 0),
                scan.backlog.get(account.address, 0),
                scan.copy_errors.get(account.address, (0, ""))[1],
            )
        )
    routes = [r for t in config.tenants if (r := _domain_route(t, accounts)) is not None]
    return StatusReport(
        version=str((live or {}).get("version", __version__)),
        running=live is not None,
        degraded=[str(why) for why in (live or {}).get("degraded", [])],
        pid=(live or {}).get("pid"),
        uptime=(live or {}).get("uptime"),
        spool_messages=sum(n for q, n in scan.queues.items() if q != Queue.CORRUPT.value),
        spool_bytes=spool_bytes(spool.root) if spool.root.is_dir() else 0,
        queues=scan.queues,
        accounts=accounts,
        routes=routes,
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
    if report.running and report.degraded:
        head = (
            f"relayd {report.version}: degraded: {'; '.join(report.degraded)} "
            f"(pid {report.pid}, up {_duration(report.uptime or 0)}; restart it)"
        )
    elif report.running:
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
        if a.sent_copy_error:
            lines.append(f"  {a.address}: Sent copies not filed: {_short(a.sent_copy_error, 100)}")
    if not report.accounts:
        lines.append(
            "(no mail sent through any account yet)"
            if report.routes
            else "(no accounts configured)"
        )
    if report.routes:
        lines.append("")
        lines.append("routes by domain (every matching sender goes out this way):")
        for r in report.routes:
            seen = f"{r.senders_seen} sender{'s' if r.senders_seen != 1 else ''} seen"
            lines.append(f"  {', '.join(r.domains)} -> tenant {r.tenant}: {r.sends_by} ({seen})")
    if report.fleet is not None:
        lines.extend(_fleet_lines(report.fleet))
    return "\n".join(lines) + "\n"


def _fleet_lines(fleet: dict[str, Any]) -> list[str]:
    lines = ["", f"fleet (this host: {fleet['host']}):"]
    if not fleet.get("reachable"):
        lines.append(f"  database unreachable: {fleet.get('error', '')}")
        return lines
    alive = fleet.get("hosts_alive", [])
    lines.append(f"  {len(alive)} hosts alive: {', '.join(alive) or '-'}")
    for p in fleet.get("paused", []):
        lines.append(f"  {p['account']}: paused on {p['host']}: {_short(p['reason'], 60)}")
    rows = [("ACCOUNT", "HOST", "QUEUED", "HELD")]
    for q in fleet.get("queues", []):
        host = q["host"] if q["alive"] else f"{q['host']} (not seen lately)"
        rows.append((q["account"], host, str(q["queued"]), str(q["held"])))
    if len(rows) > 1:
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        for row in rows:
            cells = (cell.ljust(w) for cell, w in zip(row, widths, strict=True))
            lines.append(("  " + "  ".join(cells)).rstrip())
    return lines
