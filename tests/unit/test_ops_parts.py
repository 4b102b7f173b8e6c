"""Pure parts of the ops modules: hints, metrics text, incident book, maildrop format."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from factories import make_account, make_config, make_envelope, make_tenant

from relayd.config.model import AlertsConfig, Secret
from relayd.core.envelope import DeliveryState
from relayd.core.health import AccountHealth, AccountState
from relayd.core.hints import hint_for
from relayd.core.outcome import Failure, FailureKind, Phase, Reply
from relayd.core.queues import Queue
from relayd.inbound.maildrop import Drop, encode_drop, parse_drop
from relayd.metrics import Registry
from relayd.ops.alerts import Alert, Alerter, IncidentBook, paused_alert
from relayd.ops.service import OperatorEvents
from relayd.ops.spoolview import NextTry, QueueEntry, next_try
from relayd.spool.store import Spool


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            "535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled",
            "SMTP AUTH is disabled",
        ),
        ("534-5.7.9 Application-specific password required", "application-specific password"),
        ("530 5.7.57 Client not authenticated to send mail", "not authenticated"),
        ("554 5.2.252 SendAsDenied; a@x not allowed to send as b@x", "Send As"),
        ("535 5.7.8 Error: authentication failed", "app password"),
        ("421 4.7.0 Try again later, closing connection", "throttling"),
        ("454 4.7.0 Too many login attempts, please try again later", "throttling"),
    ],
)
def test_hints(reply: str, expected: str) -> None:
    hint = hint_for(reply)
    assert hint is not None and expected in hint


def test_no_hint_for_plain_replies() -> None:
    assert hint_for("250 2.0.0 Ok") is None
    assert hint_for("network during connect: refused") is None


def test_metrics_text_format() -> None:
    registry = Registry()
    counter = registry.counter("x_total", "Things", ("account", "status"))
    counter.inc(account='a"b', status="ok")
    counter.inc(2, account='a"b', status="ok")
    histogram = registry.histogram("lat_seconds", "Latency")
    histogram.observe(0.2)
    histogram.observe(100)
    registry.gauge("depth", "Depth", lambda: [({"queue": "hold"}, 3.0)])
    text = registry.render()
    assert '# TYPE x_total counter\nx_total{account="a\\"b",status="ok"} 3.0\n' in text
    assert counter.value(account='a"b', status="ok") == 3
    assert 'lat_seconds_bucket{le="0.5"} 1.0\n' in text
    assert 'lat_seconds_bucket{le="300.0"} 2.0\n' in text
    assert 'lat_seconds_bucket{le="+Inf"} 2.0\nlat_seconds_count 2.0\n' in text
    assert "lat_seconds_sum 100.2\n" in text
    assert '# TYPE depth gauge\ndepth{queue="hold"} 3.0\n' in text


def test_a_gauge_that_cannot_be_computed_leaves_the_scrape_intact() -> None:
    registry = Registry()
    registry.gauge("broken", "Broken", lambda: [({"a": "b"}, 1 / 0)])
    registry.gauge("fine", "Fine", lambda: [({}, 1.0)])
    text = registry.render()
    assert "# TYPE broken gauge\n" in text and "fine 1.0\n" in text


def test_incident_book_once_per_incident_and_cool_down(tmp_path: Path) -> None:
    book = IncidentBook(tmp_path / "alerts.json")
    assert not book.is_open("paused:a", now=100)
    book.open("paused:a", now=100)
    book.open("expired:a", now=100, cool_down=3600)
    again = IncidentBook(tmp_path / "alerts.json")  # remembered across restarts
    assert again.is_open("paused:a", now=10**9)
    assert again.is_open("expired:a", now=3000)
    assert not again.is_open("expired:a", now=3700)  # cool-down over: a new incident
    again.close("paused:a")
    assert not IncidentBook(tmp_path / "alerts.json").is_open("paused:a", now=200)


def test_maildrop_format_round_trip_and_refusals() -> None:
    drop = Drop("a@x.test", ("b@x.test", "ü@x.test"), b"Subject: s\n\nbody\n")
    assert parse_drop(encode_drop(drop)) == drop
    for raw in (b"", b"garbage", b"RELAYD-MAILDROP 1\n", b'RELAYD-MAILDROP 1\n{"sender": "a"}\n'):
        with pytest.raises(ValueError):
            parse_drop(raw)


class RecordingAlerts:
    def __init__(self) -> None:
        self.raised: list[str] = []

    def raise_alert(self, alert: Alert, *, cool_down: float = 0.0) -> bool:
        self.raised.append(alert.kind)
        return True

    def close(self, incident: str) -> None:
        pass


def test_tls_failures_are_recognised_by_their_kind() -> None:
    alerts = RecordingAlerts()
    events = OperatorEvents(alerts, make_config)
    account = make_account("alice@acme.example")
    events.connection_failed(
        account, Failure(Phase.TLS, FailureKind.TLS, "certificate not trusted: hostname mismatch")
    )
    events.connection_failed(
        account, Failure(Phase.TLS, FailureKind.NO_STARTTLS, "server does not offer STARTTLS")
    )
    assert alerts.raised == ["tls_failed", "tls_failed"]
    events.connection_failed(account, Failure(Phase.CONNECT, FailureKind.NETWORK, "refused"))
    events.connection_failed(account, Reply(554, "5.7.0 TLS handshake failed, go away"))
    assert alerts.raised == ["tls_failed", "tls_failed"]  # no TLS failure: no alert


async def test_a_tenants_alerts_go_to_its_own_channels_and_the_top_level_ones(
    tmp_path: Path,
) -> None:
    billing = make_account("billing@acme.example", tenant="acme")
    sales = make_account("sales@globex.example", tenant="globex")
    top = AlertsConfig(
        via=None, email=None, webhook=Secret("https://hooks.ops.example/all", "literal")
    )
    acme_alerts = AlertsConfig(
        via="billing@acme.example",
        email="it@acme.example",
        webhook=Secret("https://hooks.acme.example/relayd", "env:HOOK"),
    )
    config = make_config(
        tenants=[
            make_tenant("acme", accounts=[billing], alerts=acme_alerts),
            make_tenant("globex", accounts=[sales]),
        ],
        alerts=top,
        state_directory=tmp_path,
    )
    posted: list[tuple[str, str]] = []
    queued: list[tuple[str, str | None]] = []
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.prepare()

    def post(url: str, payload: dict[str, Any]) -> int:
        posted.append((url, payload["account"]))
        return 204

    alerter = Alerter(
        config, spool, lambda queue_id, account: queued.append((queue_id, account)), post=post
    )
    assert alerter.raise_alert(paused_alert(sales, "535 5.7.8 refused"))
    await alerter.drain()
    assert (posted, queued) == ([("https://hooks.ops.example/all", "sales@globex.example")], [])

    assert alerter.raise_alert(paused_alert(billing, "535 5.7.8 refused"))
    await alerter.drain()
    assert posted[1:] == [
        ("https://hooks.ops.example/all", "billing@acme.example"),
        ("https://hooks.acme.example/relayd", "billing@acme.example"),
    ]
    # The email to the tenant's admin is spooled, from the tenant's own mailbox... which is
    # the paused one here, so it is not sent through it (it would wait in the same lane).
    assert queued == []

    other = make_account("ops@acme.example", tenant="acme")
    assert alerter.raise_alert(paused_alert(other, "535 5.7.8 refused"))
    await alerter.drain()
    assert [account for _, account in queued] == ["billing@acme.example"]
    envelope = spool.load(queued[0][0], Queue.INCOMING).envelope
    assert (envelope.sender, envelope.recipients) == ("billing@acme.example", ("it@acme.example",))


def _queued(queue: Queue, **state: Any) -> QueueEntry:
    return QueueEntry("Q1", queue, make_envelope(), DeliveryState(**state), 100)


def test_next_try_says_when_and_what_a_message_waits_for() -> None:
    address = make_envelope().account
    ok = AccountHealth(address=address)
    unhealthy = AccountHealth(
        address=address, state=AccountState.UNHEALTHY, reason="connection refused", retry_at=900.0
    )
    paused = AccountHealth(
        address=address, state=AccountState.PAUSED, reason="credentials refused", retry_at=700.0
    )
    deferred = _queued(Queue.DEFERRED, attempts=1, next_attempt_at=500.0)
    assert next_try(deferred, ok) == NextTry(500.0, "its next retry")
    assert next_try(deferred, None) == NextTry(500.0, "its next retry")
    # An unhealthy account is not tried before its probe, whatever the message's own time.
    assert next_try(deferred, unhealthy) == NextTry(
        900.0, "account unhealthy (connection refused): waiting for its next probe"
    )
    late = _queued(Queue.DEFERRED, attempts=3, next_attempt_at=1000.0)
    assert next_try(late, unhealthy) == NextTry(1000.0, "its next retry")
    assert next_try(_queued(Queue.INCOMING), ok).at is None
    held = _queued(Queue.HOLD, attempts=2)
    assert next_try(held, paused) == NextTry(
        700.0,
        "account paused (credentials refused): held until its credentials are fixed; the next "
        "probe logs in to see",
    )
    by_operator = _queued(Queue.HOLD, operator_hold=True)
    assert next_try(by_operator, paused).waiting_for.startswith("held by the operator")
    assert next_try(by_operator, ok) == NextTry(
        None, "held by the operator until `relayd queue release`"
    )
    operator_paused = replace(paused, operator_paused=True)
    assert next_try(held, operator_paused) == NextTry(
        None, "account paused by the operator (credentials refused)"
    )
