"""The hub process's metrics, in Prometheus terms.

Layer: core; imports only prometheus_client and `hub.worker_metrics` (counter names).

One `Metrics` object per hub instance, on its own registry, so that several
hubs in one process (tests, benchmarks) do not collide.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from threading import Lock
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from hub.worker_metrics import COUNTERS as WORKER_COUNTER_HELP


class WorkerCounts:
    """The workers' counters as last read from the database (a Prometheus collector).

    Workers are other processes and count in the database (hub.worker_metrics);
    the hub reads the sums now and then, off the event loop, and `/metrics`
    renders the last reading, so a scrape never waits on the database.
    """

    def __init__(self) -> None:
        self._lock = Lock()
        self._counters: dict[str, int] = dict.fromkeys(WORKER_COUNTER_HELP, 0)
        self._dead_letters: dict[str, int] = {}
        self._read = False

    def update(self, counters: Mapping[str, int], dead_letters: Mapping[str, int]) -> None:
        with self._lock:
            self._counters.update(counters)
            self._dead_letters = dict(dead_letters)
            self._read = True

    def snapshot(self) -> dict[str, Any]:
        """For `/status`: the counters, dead letters by status, and whether read yet."""
        with self._lock:
            return {
                **self._counters,
                "dead_letters_by_status": dict(self._dead_letters),
                "read": self._read,
            }

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counters = dict(self._counters)
            dead = dict(self._dead_letters)
        for name, value in counters.items():
            help_text = WORKER_COUNTER_HELP.get(name, name)
            yield CounterMetricFamily(f"hub_worker_{name}", help_text, value=value)
        family = GaugeMetricFamily(
            "hub_dead_letters", "Dead letters in the database by status", labels=["status"]
        )
        for status, count in dead.items():
            family.add_metric([status], count)
        yield family


class Metrics:
    """Counters and gauges of one hub instance."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages_received = Counter(
            "hub_messages_received", "Device messages read", ["transport"], registry=r
        )
        self.messages_acked = Counter(
            "hub_messages_acked",
            "Device messages acknowledged once durable",
            ["transport"],
            registry=r,
        )
        self.protocol_errors = Counter(
            "hub_protocol_errors", "Frames refused by a codec", ["transport", "reason"], registry=r
        )
        self.auth_failures = Counter(
            "hub_auth_failures", "Refused connects", ["transport", "reason"], registry=r
        )
        self.acl_refusals = Counter(
            "hub_acl_refusals", "Refused MQTT publishes or subscribes", ["action"], registry=r
        )
        self.invalid_payloads = Counter(
            "hub_invalid_payloads",
            "Messages whose payload was not valid",
            ["transport"],
            registry=r,
        )
        self.connections_refused = Counter(
            "hub_connections_refused",
            "Connections closed as soon as accepted (a listener at its connection limit)",
            ["transport", "reason"],
            registry=r,
        )
        self.connections = Gauge(
            "hub_connections", "Open device connections", ["transport"], registry=r
        )
        self.batches_published = Counter(
            "hub_batches_published", "Task messages confirmed by the broker", registry=r
        )
        self.envelopes_published = Counter(
            "hub_envelopes_published", "Envelopes confirmed by the broker", registry=r
        )
        self.envelopes_spooled = Counter(
            "hub_envelopes_spooled", "Envelopes written to the local spool", registry=r
        )
        self.dispatch_pending = Gauge(
            "hub_dispatch_pending",
            "Envelopes accepted and not yet durable (dispatch_max_pending_messages bounds them)",
            registry=r,
        )
        self.dispatch_full = Counter(
            "hub_dispatch_full",
            "Times the dispatcher was full and the device connections stopped reading",
            registry=r,
        )
        self.spool_size = Gauge("hub_spool_messages", "Envelopes in the local spool", registry=r)
        self.broker_connected = Gauge(
            "hub_broker_connected", "1 while the task broker is reachable", registry=r
        )
        self.worker_counts = WorkerCounts()
        r.register(self.worker_counts)

    def render(self) -> bytes:
        return generate_latest(self.registry)
