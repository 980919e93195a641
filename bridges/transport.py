"""The seams between the composition root and the device transports.

Layer: bridges; imports the `hub` core only (types). Every transport (the TCP
codec listeners, the embedded MQTT broker, the external-broker bridge) is
used by the root through these Protocols, never through `Any`, `getattr` or
`hasattr`. What a transport can do is a type-checked fact: a transport that
can deliver commands implements `CommandTransport`, and the root holds it as
one where it builds it (`hubapp.app`), so handing commands to one that cannot
is a mypy error.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

from bridges.backpressure import Room
from hub.commands import PendingCommand
from hub.envelope import Envelope


class EnvelopeSink(Protocol):
    """Where a transport hands envelopes (bridges.dispatch.Dispatcher). The
    future resolves once the envelope is durable: only then may the device be
    acknowledged (docs/delivery.md). While its `room` is full, device
    connections stop reading (bridges.backpressure)."""

    @property
    def room(self) -> Room: ...

    def submit(self, envelope: Envelope) -> asyncio.Future[None]: ...

    def submit_batched(self, envelope: Envelope) -> asyncio.Future[None]:
        """`submit`, where the future may be shared by the other envelopes of
        its batch (one future per batch, bridges.dispatch); never cancel it."""
        ...


class ConnectionEvents(Protocol):
    """Told when a device becomes reachable for commands on a transport of this
    hub, or stops being (bridges.downlink.Downlink)."""

    def device_connected(self, device_id: str, transport: str) -> None: ...

    def device_disconnected(self, device_id: str) -> None: ...


@runtime_checkable
class Transport(Protocol):
    """A way in for devices, started and stopped by the root."""

    #: Short name for logs, status and listener lists ("tcp", "mqtt").
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    @property
    def serving(self) -> bool:
        """True between a successful start and stop (for /readyz)."""
        ...

    @property
    def connected_devices(self) -> int | None:
        """Authenticated devices connected through this transport now (None where
        the hub cannot know: an external broker holds the connections)."""
        ...


@runtime_checkable
class CommandTransport(Transport, Protocol):
    """A transport that can reach devices with commands."""

    def deliver_command(self, command: PendingCommand) -> bool:
        """Send `command` if its device is reachable here; False leaves it
        pending (bridges.downlink retries on the device's next connect)."""
        ...

    async def disconnect_device(self, device_id: str) -> int:
        """Drop the device's connections here (it was re-keyed or removed);
        returns how many were dropped."""
        ...


@runtime_checkable
class ListeningTransport(Transport, Protocol):
    """A transport that listens on a local port (not the external bridge)."""

    @property
    def port(self) -> int: ...
