"""`Dispatcher.submit_batched`: one future per batch, against the real RabbitMQ.

The MQTT fast path (docs/mqtt.md, "The fast path") submits with it, so that a
batch of thousands of envelopes costs one future and one resolution instead
of one per envelope.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from bridges.dispatch import Dispatcher
from hub.envelope import Envelope, Kind, envelope_id
from hub.metrics import Metrics
from hub.settings import Settings

pytestmark = pytest.mark.integration


def telemetry(device_id: str, seq: int) -> Envelope:
    return Envelope(
        id=envelope_id(device_id, seq),
        device_id=device_id,
        kind=Kind.TELEMETRY,
        payload={"n": seq},
        transport="mqtt",
        protocol="mqtt",
        seq=seq,
    )


def test_envelopes_submitted_batched_share_their_batchs_future(
    hub_settings_factory: Callable[..., Settings], device_prefix: str
) -> None:
    settings = hub_settings_factory()
    device_id = f"{device_prefix}dev"

    async def main() -> None:
        metrics = Metrics()
        dispatcher = Dispatcher(settings, metrics)
        await dispatcher.start()
        try:
            first = [dispatcher.submit_batched(telemetry(device_id, n)) for n in range(1, 4)]
            own = dispatcher.submit(telemetry(device_id, 4))  # one of its own, same batch
            assert first[0] is first[1] is first[2]
            assert own is not first[0]
            await asyncio.wait_for(asyncio.gather(first[0], own), 30)
            # A later batch has a future of its own.
            later = dispatcher.submit_batched(telemetry(device_id, 5))
            assert later is not first[0] and not later.done()
            await asyncio.wait_for(later, 30)
        finally:
            await dispatcher.stop()
        assert metrics.registry.get_sample_value("hub_envelopes_published_total") == 5

    asyncio.run(main())
