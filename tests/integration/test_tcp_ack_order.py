"""The hub writes a batch's TCP ACKs together, one write per connection per batch
(the second test counts the writes; it saw one per message before), and they
still come in the order the frames were sent, each once, with none lost, across
many batches, with a keep-alive answered in the middle of the stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine

from hub.protocol.events import Ack, ConnectionClosed, Ping, Pong, Telemetry
from hub.storage import count_rows
from tests.support.processes import HubThread, Worker, wait_until
from tests.support.raw_device import RawDevice

pytestmark = pytest.mark.integration

MESSAGES = 600


def _read(device: RawDevice, acks: int) -> tuple[list[int], list[Any]]:
    """ACKed seqs in arrival order, and every other event, until `acks` ACKs came."""
    acked: list[int] = []
    others: list[Any] = []
    while len(acked) < acks:
        event = device.next_event(timeout=30)
        if isinstance(event, Ack):
            acked.append(event.seq)
        elif isinstance(event, ConnectionClosed):
            raise AssertionError(f"closed after {len(acked)} ACKs; also got {others!r}")
        else:
            others.append(event)
    return acked, others


def test_acks_of_a_long_burst_come_once_each_and_in_order(
    connect: Callable[[int], RawDevice],
    worker: Worker,
    running_hub: Callable[..., HubThread],
    provision: Callable[[list[str]], dict[str, str]],
    engine: Engine,
    device_prefix: str,
) -> None:
    # Small batches, so that the burst spans many of them.
    hub = running_hub(batch_max_messages=37, max_inflight_per_connection=MESSAGES * 2)
    device_id = f"{device_prefix}burst"
    creds = provision([device_id])
    device = connect(hub.tcp_port)
    assert device.hello(device_id, creds[device_id]) == Ack(0)

    # One write of every frame, a PING in the middle (its PONG is written at once,
    # past the ACKs still waiting for their batch).
    frames = b"".join(
        device.codec.send(Ping(seq=0) if seq == 300 else Telemetry(seq=seq, payload={"n": seq}))
        for seq in range(1, MESSAGES + 1)
    )
    device.send_raw(frames)
    acked, others = _read(device, MESSAGES - 1)

    assert acked == [seq for seq in range(1, MESSAGES + 1) if seq != 300]
    assert [type(event) for event in others] == [Pong]
    assert wait_until(lambda: count_rows(engine, device_prefix=device_prefix) >= MESSAGES - 1)
    assert hub.counter("hub_messages_acked_total", transport="tcp") == MESSAGES - 1


class _CountingTransport:
    """The connection's transport, counting the writes that carry ACKs."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self._inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_a_batch_s_acks_are_one_write_per_connection(
    connect: Callable[[int], RawDevice],
    worker: Worker,
    running_hub: Callable[..., HubThread],
    provision: Callable[[list[str]], dict[str, str]],
    device_prefix: str,
) -> None:
    hub = running_hub(batch_max_messages=50, max_inflight_per_connection=1000)
    device_id = f"{device_prefix}one"
    creds = provision([device_id])
    device = connect(hub.tcp_port)
    assert device.hello(device_id, creds[device_id]) == Ack(0)
    connection = hub.app.tcp_servers[0].devices[device_id]
    counting = _CountingTransport(connection._transport)

    def swap() -> None:
        connection._transport = counting  # type: ignore[assignment]

    hub.call_soon(swap)
    batches_before = hub.counter("hub_batches_published_total")

    count = 400
    device.send_raw(
        b"".join(
            device.codec.send(Telemetry(seq=seq, payload={"n": seq})) for seq in range(1, count + 1)
        )
    )
    acked, others = _read(device, count)

    assert acked == list(range(1, count + 1)) and others == []
    batches = hub.counter("hub_batches_published_total") - batches_before
    # At most one write per confirmed batch (one per message before).
    assert 1 <= counting.writes <= batches < count
