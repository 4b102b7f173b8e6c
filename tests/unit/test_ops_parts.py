"""Pure parts of the ops modules: hints, metrics text, incident book, maildrop format."""

from __future__ import annotations

from pathlib import Path

import pytest
from factories import make_account, make_config

from relayd.core.hints import hint_for
from relayd.core.outcome import Failure, FailureKind, Phase, Reply
from relayd.inbound.maildrop import Drop, encode_drop, parse_drop
from relayd.metrics import Registry
from relayd.ops.alerts import Alert, IncidentBook
from relayd.ops.service import OperatorEvents


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
