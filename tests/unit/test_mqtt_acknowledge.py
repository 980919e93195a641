"""Unit tests for the one rule that decides when an MQTT message may be
acknowledged (bridges.mqtt.tap.may_acknowledge), shared by the embedded broker
and the external-broker bridge (docs/delivery.md)."""

from __future__ import annotations

import asyncio

import pytest

from bridges.mqtt.tap import may_acknowledge, wait_durable
from hub.errors import DispatchError


def outcome(setup: str) -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    if setup == "durable":
        future.set_result(None)
    elif setup == "refused":
        future.set_exception(DispatchError("the spool is full"))
    elif setup == "bug":
        future.set_exception(RuntimeError("a bug in the dispatcher"))
    else:
        future.cancel()
    return future


@pytest.mark.parametrize(
    ("setup", "acknowledged"),
    [("durable", True), ("refused", False), ("bug", False), ("cancelled", False)],
)
def test_only_a_durable_message_is_acknowledged(setup: str, acknowledged: bool) -> None:
    async def judge() -> tuple[bool, bool | None]:
        future = outcome(setup)
        waited = None if future.cancelled() else await wait_durable(future, "test")
        return may_acknowledge(future, "test"), waited

    judged, waited = asyncio.run(judge())
    assert judged is acknowledged
    assert waited in (None, acknowledged)


def test_waiting_is_cancelled_without_cancelling_the_dispatchers_future() -> None:
    async def scenario() -> bool:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = asyncio.ensure_future(wait_durable(future, "test"))
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return future.cancelled()

    assert asyncio.run(scenario()) is False
