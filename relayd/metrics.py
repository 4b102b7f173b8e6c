"""Prometheus metrics: a small registry and its text exposition format (version 0.0.4).

The ground floor of relayd: every layer counts through the module-level metrics declared
here and none of them needs the operator package to do so, e.g.::

    from relayd.metrics import TOKEN_REFRESHES
    TOKEN_REFRESHES.inc(account="alice@acme.example", result="ok")

Counting never does I/O and never raises, so it is safe on any path of the event loop. The
HTTP endpoint that serves ``REGISTRY`` is ``relayd.ops.metrics_http``.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Sequence

__all__ = [
    "ACCEPTED",
    "ALERTS",
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

Labels = tuple[tuple[str, str], ...]
# A gauge sample computed at scrape time: (labels, value).
Sample = tuple[dict[str, str], float]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _label_text(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() else repr(value)


class Counter:
    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.label_names = tuple(labels)
        self._values: dict[Labels, float] = {}
        # Token refreshes may be counted from a worker thread (msal runs in one).
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> Labels:
        return tuple((name, str(labels.get(name, ""))) for name in self.label_names)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items())
        lines += [f"{self.name}{_label_text(k)} {_number(v)}" for k, v in items]
        return lines


# Delivery latency from acceptance to the upstream's reply: seconds for a healthy provider,
# up to days for mail that waited out an outage.
DEFAULT_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)


class Histogram:
    def __init__(
        self, name: str, help_text: str, buckets: Sequence[float] = DEFAULT_BUCKETS
    ) -> None:
        self.name = name
        self.help = help_text
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0
        self._count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._sum += value
            self._count += 1
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1

    @property
    def count(self) -> int:
        return self._count

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            counts, total, count = list(self._counts), self._sum, self._count
        for bound, n in zip(self.buckets, counts, strict=True):
            lines.append(f'{self.name}_bucket{{le="{_number(float(bound))}"}} {n}')
        lines.append(f'{self.name}_bucket{{le="+Inf"}} {count}')
        lines.append(f"{self.name}_sum {_number(total)}")
        lines.append(f"{self.name}_count {count}")
        return lines


class _Gauge:
    """Gauges are computed when scraped (queue depth is read from the spool then)."""

    def __init__(self, name: str, help_text: str, collect: Callable[[], Iterable[Sample]]) -> None:
        self.name = name
        self.help = help_text
        self.collect = collect

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge"]
        try:
            samples = list(self.collect())
        except Exception:  # a scrape must not fail because one gauge could not be read
            log.exception("metrics: cannot compute %s", self.name)
            return lines
        for labels, value in sorted(samples, key=lambda s: sorted(s[0].items())):
            lines.append(f"{self.name}{_label_text(tuple(labels.items()))} {_number(value)}")
        return lines


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, Counter | Histogram | _Gauge] = {}

    def counter(self, name: str, help_text: str, labels: Sequence[str] = ()) -> Counter:
        metric = Counter(name, help_text, labels)
        self._metrics[name] = metric
        return metric

    def histogram(self, name: str, help_text: str) -> Histogram:
        metric = Histogram(name, help_text)
        self._metrics[name] = metric
        return metric

    def gauge(self, name: str, help_text: str, collect: Callable[[], Iterable[Sample]]) -> None:
        """(Re)define a gauge; the daemon sets its collectors when it starts."""
        self._metrics[name] = _Gauge(name, help_text, collect)

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics.values():
            lines += metric.render()
        return "\n".join(lines) + "\n"


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
