"""Live updates for browsers and scripts: presence changes, new telemetry, command results.

Layer: console; imports the `hub` core.

The console learns what changed from the database the hub and the workers
write, not from the hub itself, so it needs no hub to run and no hub needs
it. One poller per console process looks every `interval_s` (indexed queries
on `device_state.updated_at`, `commands.finished_at` and the small hubs and
connections tables) and fans the changes out to every subscriber's bounded
queue. A subscriber that does not keep up loses its oldest events and is told
so (an `overflow` event: the page reloads what it shows).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine

from hub.fleet import commands_finished_since, states_updated_since
from hub.hubs import live_connections

log = logging.getLogger(__name__)

QUEUE_BOUND = 1000


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # presence | telemetry | command | overflow
    data: dict[str, Any]

    def sse(self) -> str:
        return f"event: {self.kind}\ndata: {json.dumps(self.data, default=str)}\n\n"


@dataclass
class _Cursor:
    """What the poller has told already. Each look re-reads a few seconds back
    (a worker may commit a row stamped before the previous look) and skips what
    it has sent: the newest state time per device, the finished command ids."""

    since: datetime
    presence: dict[str, tuple[str, str]] = field(default_factory=dict)
    state_sent: dict[str, datetime] = field(default_factory=dict)
    commands_sent: dict[str, datetime] = field(default_factory=dict)


SLACK = timedelta(seconds=5)


class EventHub:
    """Polls the database and broadcasts what changed; `subscribe()` per client."""

    def __init__(self, engine: Engine, interval_s: float = 1.0) -> None:
        self._engine = engine
        self._interval_s = interval_s
        self._subscribers: set[asyncio.Queue[Event]] = set()
        self._task: asyncio.Task[None] | None = None
        self.polls = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def subscribe(self) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(QUEUE_BOUND)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self._subscribers.discard(queue)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def publish(self, event: Event) -> None:
        for queue in list(self._subscribers):
            if queue.full():
                # Keep the newest: drop the oldest and say so once.
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(Event("overflow", {}))
                continue
            queue.put_nowait(event)

    async def _run(self) -> None:
        cursor = _Cursor(datetime.now(UTC))
        with contextlib.suppress(Exception):
            cursor.presence = await asyncio.to_thread(live_connections, self._engine)
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                events = await asyncio.to_thread(self._poll, cursor)
            except Exception:  # boundary: the database is away; try again next time
                log.exception("live events: polling the database failed")
                continue
            self.polls += 1
            for event in events:
                self.publish(event)

    def _poll(self, cursor: _Cursor) -> list[Event]:
        events: list[Event] = []
        presence = live_connections(self._engine)
        for device_id in presence.keys() - cursor.presence.keys():
            hub_id, transport = presence[device_id]
            events.append(
                Event(
                    "presence",
                    {"device": device_id, "online": True, "hub": hub_id, "transport": transport},
                )
            )
        for device_id in cursor.presence.keys() - presence.keys():
            events.append(
                Event(
                    "presence",
                    {
                        "device": device_id,
                        "online": False,
                        "hub": None,
                        "transport": cursor.presence[device_id][1],
                    },
                )
            )
        cursor.presence = presence
        look_from = cursor.since - SLACK
        cursor.since = datetime.now(UTC)
        for device_id, updated_at, values in states_updated_since(self._engine, look_from):
            sent = cursor.state_sent.get(device_id)
            if sent is not None and updated_at <= sent:
                continue
            cursor.state_sent[device_id] = updated_at
            events.append(
                Event(
                    "telemetry",
                    {"device": device_id, "at": updated_at.isoformat(), "values": values},
                )
            )
        for command in commands_finished_since(self._engine, look_from):
            if command.id in cursor.commands_sent:
                continue
            assert command.finished_at is not None
            cursor.commands_sent[command.id] = command.finished_at
            events.append(
                Event(
                    "command",
                    {
                        "id": command.id,
                        "device": command.device_id,
                        "name": command.name,
                        "status": command.status,
                    },
                )
            )
        for command_id, finished in list(cursor.commands_sent.items()):
            if finished < look_from:
                del cursor.commands_sent[command_id]
        return events
