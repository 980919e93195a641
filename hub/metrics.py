"""The hub process's metrics, in Prometheus terms.

Layer: core; imports only prometheus_client.

One `Metrics` object per hub instance, on its own registry, so that several
hubs in one process (tests, benchmarks) do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


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
        self.spool_size = Gauge("hub_spool_messages", "Envelopes in the local spool", registry=r)
        self.broker_connected = Gauge(
            "hub_broker_connected", "1 while the task broker is reachable", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
