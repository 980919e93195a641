"""Downlink: commands from RabbitMQ to the devices this hub process holds.

Layer: bridges; imports the `hub` core only.

Each hub process has its own queue (`hub.downlink.<hub id>`), consumed on a
dedicated thread so the event loop never waits on the broker. `send_command`
(in `tasks.commands`) finds the hub that holds the device in the
`device_connections` table and publishes there. When a device connects, the
hub records the connection and delivers the device's pending commands from
the database, which covers commands sent while it was offline, or sent to a
hub that died while it held the device (its queue is gone with it, so the
message is not routed; the command waits in the database for the device's
next connect to any hub). See hub/commands.py for why this never misses a
command.

Neither way hands a command twice to one connection: a message on the queue
is only a nudge, delivered at least once by RabbitMQ and possibly after the
command was answered (a nudge waiting in the queue of a hung hub), so the
command is handed over only while the database still has it open, and only
if this connection of the device has not had it yet (the nudge and the read
on connect may both find a command sent while the device was connecting).

Connects and disconnects are written by one writer task, on a thread, in
batches: whatever arrived while the previous batch was written goes in one
transaction (`hub.commands.record_connections`), and the pending commands of
every device that connected are read in one query. One commit per connect
made a connection storm (every device reconnecting after a restart) wait on
thousands of commits; one writer also keeps each device's records in order.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kombu import Connection, Consumer, Exchange, Queue
from sqlalchemy import Engine

from bridges.queues import connect
from hub.commands import (
    OPEN,
    ConnectionChange,
    PendingCommand,
    command_status,
    downlink_queue,
    forget_hub,
    pending_commands_of,
    record_connections,
)
from hub.control import is_control
from hub.settings import Settings

log = logging.getLogger(__name__)

#: A transport's way to hand a command to a connected device; False if it does not hold it.
Deliver = Callable[[PendingCommand], bool]
#: Who handles control messages to this hub (hub/control.py), called on the loop.
ControlHandler = Callable[[dict[str, Any]], None]
#: Most connection changes written in one transaction.
MAX_CHANGES_PER_BATCH = 5000


class Downlink:
    """Routes commands to this hub's devices and tracks which devices it holds."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.hub_id = settings.hub_id or uuid.uuid4().hex[:16]
        self._settings = settings
        self._engine = engine
        self._transports: list[Deliver] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        # Connection changes not written yet, and the task writing them (if any).
        self._changes: list[ConnectionChange] = []
        self._writer: asyncio.Future[None] | None = None
        self.delivered = 0
        # Per device, the commands handed to its current connection (see above).
        self._handed: dict[str, set[str]] = {}
        self._control: ControlHandler | None = None

    def on_control(self, handler: ControlHandler) -> None:
        """Route control messages (hub/control.py) that arrive on this hub's queue."""
        self._control = handler

    def add_transport(self, deliver: Deliver) -> None:
        self._transports.append(deliver)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._consume, name="hub-downlink", daemon=True)
        self._thread.start()
        # Devices may be registered as held by this hub only once its queue exists.
        await asyncio.to_thread(self._ready.wait, 30)

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None
        for task in list(self._tasks):
            await asyncio.gather(task, return_exceptions=True)
        await asyncio.to_thread(forget_hub, self._engine, self.hub_id)

    # -- connection events from the transports (called on the loop) ---------

    def device_connected(self, device_id: str, transport: str) -> None:
        # A new connection has had nothing yet, whatever the previous one had.
        self._handed[device_id] = set()
        # The connect's time, not when its record is written.
        self._record(ConnectionChange(device_id, transport, datetime.now(UTC)))

    def device_disconnected(self, device_id: str) -> None:
        self._handed.pop(device_id, None)
        self._record(ConnectionChange(device_id, None, datetime.now(UTC)))

    def _record(self, change: ConnectionChange) -> None:
        self._changes.append(change)
        if self._writer is None:
            task = asyncio.ensure_future(self._write_changes())
            self._writer = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _write_changes(self) -> None:
        """Write the changes queued, batch after batch, until none is left."""
        try:
            while self._changes:
                batch = self._changes[:MAX_CHANGES_PER_BATCH]
                del self._changes[:MAX_CHANGES_PER_BATCH]
                await self._write_batch(batch)
        finally:
            # No await since the list was found empty: the next change starts a writer.
            self._writer = None

    async def _write_batch(self, batch: list[ConnectionChange]) -> None:
        try:
            await asyncio.to_thread(record_connections, self._engine, self.hub_id, batch)
        except Exception:  # boundary: the database is away; the next connect records it
            log.exception("could not record %d connection change(s)", len(batch))
            return
        # Devices whose last change here is a connect get their pending commands.
        last = {change.device_id: change.transport for change in batch}
        devices = [device for device, transport in last.items() if transport is not None]
        if not devices:
            return
        try:
            pending = await asyncio.to_thread(pending_commands_of, self._engine, devices)
        except Exception:  # boundary: the database is away; commands wait for the next connect
            log.exception("could not read the pending commands of %d device(s)", len(devices))
            return
        for device in devices:
            for command in pending.get(device, ()):
                self.deliver(command)

    # -- delivery ------------------------------------------------------------

    def deliver(self, command: PendingCommand) -> bool:
        if command.expired():
            return False
        handed = self._handed.get(command.device_id)
        if handed is not None and command.id in handed:
            return True  # this connection has it already
        for transport in self._transports:
            if transport(command):
                self.delivered += 1
                if handed is not None:
                    handed.add(command.id)
                return True
        log.info(
            "command %s: device %r is not connected here; it waits for the connect",
            command.id,
            command.device_id,
        )
        return False

    # -- the consumer thread -----------------------------------------------------

    def _queue(self) -> Queue:
        # Bound only to the default exchange: a sender addresses the queue by
        # name, and a command for a hub that is gone is simply not routed (it
        # waits in the database for the device's next connect). This also works
        # on the embedded local queue, whose bindings live in each process.
        name = downlink_queue(self.hub_id)
        return Queue(name, Exchange(""), routing_key=name, durable=False, auto_delete=True)

    def _on_message(self, body: Any, message: Any) -> None:
        if is_control(body):
            if self._control is not None:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._control, body)
            message.ack()
            return
        try:
            command = PendingCommand.from_dict(body)
        except (KeyError, TypeError, ValueError) as exc:
            log.error("dropping a malformed downlink message: %s", exc)
        else:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._nudged, command)
        # The command is in the database either way; the message is only a nudge.
        message.ack()

    def _nudged(self, command: PendingCommand) -> None:
        """A nudge from the queue (on the loop): deliver if the command is still open."""

        async def check_then_deliver() -> None:
            try:
                status = await asyncio.to_thread(command_status, self._engine, command.id)
            except Exception:  # boundary: the database is away; the next connect delivers it
                log.exception("could not read the status of command %s", command.id)
                return
            if status in OPEN:
                self.deliver(command)
            else:
                log.info("command %s is %s already; its late nudge is dropped", command.id, status)

        task = asyncio.ensure_future(check_then_deliver())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _consume(self) -> None:
        # One warning per outage, not one per retry (every broker_retry_interval_s).
        down = False
        while not self._stop.is_set():
            try:
                with Connection(self._settings.effective_broker_url) as conn:
                    # Each listed node in turn (a cluster): the queue is declared
                    # again on whichever answers.
                    connect(conn)
                    with Consumer(
                        conn, [self._queue()], callbacks=[self._on_message], accept=["json"]
                    ):
                        self._ready.set()
                        if down:
                            log.info("downlink consumer: task broker reachable again")
                            down = False
                        while not self._stop.is_set():
                            try:
                                conn.drain_events(timeout=0.5)
                            except TimeoutError:
                                continue
            except Exception as exc:  # boundary: broker away; try again shortly
                if self._stop.is_set():
                    break
                if not down:
                    log.warning("downlink consumer: %s; retrying until it answers", exc)
                    down = True
                self._ready.set()  # do not hold the start-up hostage to the broker
                self._stop.wait(self._settings.broker_retry_interval_s)
