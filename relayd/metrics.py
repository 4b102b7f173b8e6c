"""Prometheus metrics: relayd's registry, counted through ``prometheus_client``.

The ground floor of relayd: every layer counts through the module-level metrics declared
here and none of them needs the operator or web package to do so, e.g.::

    from relayd.metrics import TOKEN_REFRESHES
    TOKEN_REFRESHES.inc(account="alice@acme.example", result="ok")

Counting never does I/O and never raises, so it is safe on any path of the event loop (and
from the worker threads msal runs in: prometheus_client's values are locked). Gauges are
computed when scraped (queue depth is read from the spool then) by one custom collector.
The registry is relayd's own, not prometheus_client's process-wide default, so the
exposition holds relayd's series and nothing an imported library registers. The HTTP
endpoints that serve it are in ``relayd.web.exposition``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

import prometheus_client
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "ACCEPTED",
    "ALERTS",
    "CONTENT_TYPE",
    "DELIVERY_LATENCY",
    "IMAP_COPIES",
    "RECIPIENTS",
    "REGISTRY",
    "TOKEN_REFRESHES",
    "Counter",
    "Histogram",
    "Registry",
    "Sample",
]

log = logging.getLogger(__name__)

# The exposition of ``_created`` series doubles every counter's lines for a timestamp that
# the daemon's start time (relayd_start_time_seconds) already gives.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]

#: The text exposition format, version 0.0.4.
CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST

# A gauge sample computed at scrape time: (labels, value).
Sample = tuple[dict[str, str], float]

# Delivery latency from acceptance to the upstream's reply: seconds for a healthy provider,
# up to days for mail that waited out an outage.
DEFAULT_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)


class Counter:
    """A counter whose labels are given by name at each count."""

    def __init__(self, inner: prometheus_client.Counter, labels: Sequence[str]) -> None:
        self._inner = inner
        self.label_names = tuple(labels)

    def _child(self, labels: dict[str, str]) -> prometheus_client.Counter:
        if not self.label_names:
            return self._inner
        return self._inner.labels(*(str(labels.get(name, "")) for name in self.label_names))

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        self._child(labels).inc(amount)

    def value(self, **labels: str) -> float:
        return float(self._child(labels)._value.get())


class Histogram:
    def __init__(self, inner: prometheus_client.Histogram) -> None:
        self._inner = inner
        self._count = 0

    def observe(self, value: float) -> None:
        self._inner.observe(value)
        self._count += 1

    @property
    def count(self) -> int:
        return self._count


class _ScrapeTimeGauges(Collector):
    """The gauges whose values are computed when scraped; one broken gauge leaves the rest
    of the scrape intact."""

    def __init__(self) -> None:
        self.gauges: dict[str, tuple[str, Callable[[], Iterable[Sample]]]] = {}

    def collect(self) -> Iterator[Metric]:
        for name, (help_text, compute) in list(self.gauges.items()):
            try:
                samples = list(compute())
            except Exception:  # a scrape must not fail because one gauge could not be read
                log.exception("metrics: cannot compute %s", name)
                yield GaugeMetricFamily(name, help_text)
                continue
            label_names = list(dict.fromkeys(k for labels, _ in samples for k in labels))
            family = GaugeMetricFamily(name, help_text, labels=label_names)
            for labels, value in sorted(samples, key=lambda s: sorted(s[0].items())):
                family.add_metric([labels.get(k, "") for k in label_names], value)
            yield family

    def describe(self) -> Iterable[Metric]:
        return ()  # names change as gauges are defined: no duplicate check at registration


class Registry:
    def __init__(self) -> None:
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        self._gauges = _ScrapeTimeGauges()
        self.registry.register(self._gauges)

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        inner = prometheus_client.Counter(
            name, help_text, labelnames=tuple(labels), registry=self.registry
        )
        return Counter(inner, labels)

    def histogram(
        self, name: str, help_text: str, buckets: Sequence[float] = DEFAULT_BUCKETS
    ) -> Histogram:
        inner = prometheus_client.Histogram(
            name, help_text, buckets=tuple(buckets), registry=self.registry
        )
        return Histogram(inner)

    def gauge(self, name: str, help_text: str, collect: Callable[[], Iterable[Sample]]) -> None:
        """(Re)define a gauge; the daemon sets its collectors when it starts."""
        self._gauges.gauges[name] = (help_text, collect)

    def render(self) -> str:
        return prometheus_client.generate_latest(self.registry).decode()


REGISTRY = Registry()
ACCEPTED = REGISTRY.counter(
    "relayd_messages_accepted_total", "Messages accepted into the spool (SMTP, sendmail)"
)
RECIPIENTS = REGISTRY.counter(
    "relayd_recipients_total",
    "Delivery attempts per recipient by outcome (delivered, deferred, bounced, held)",
    ("account", "status"),
)
DELIVERY_LATENCY = REGISTRY.histogram(
    "relayd_delivery_latency_seconds", "Time from acceptance to delivery upstream"
)
TOKEN_REFRESHES = REGISTRY.counter(
    "relayd_token_refreshes_total", "OAuth2 token refreshes", ("account", "result")
)
IMAP_COPIES = REGISTRY.counter(
    "relayd_imap_copies_total", "Sent copies filed over IMAP", ("account", "result")
)
ALERTS = REGISTRY.counter("relayd_alerts_total", "Alerts raised", ("kind",))
