"""Commands to devices: `send_command` and the tasks that complete its result.

Layer: tasks; imports the `hub` core only (the hub processes are reached
through RabbitMQ, never imported).

`send_command(device_id, name, args, ttl)` returns a Celery `AsyncResult`
whose id is the command id. The device's answer, whichever transport and hub
process it comes through, reaches `tasks.ingest.command_result`, which
completes that result in the shared result backend; an `expire` task
scheduled at the time to live fails it with `CommandExpired` if nothing came.
Whoever moves the command out of `pending` first (hub.commands) writes the
result, so exactly one outcome is ever stored. A command for a device no hub
holds goes to one live hub that bridges an external MQTT broker, if any, which
publishes it there.
"""

from __future__ import annotations

import logging
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from celery.result import AsyncResult
from sqlalchemy import select

from hub.commands import (
    EXPIRED,
    EXTERNAL_MQTT_LISTENER,
    FAILED,
    OPEN,
    SUCCEEDED,
    create_command,
    downlink_queue,
    finish_command,
)
from hub.control import disconnect_message
from hub.envelope import Envelope, validate_device_id
from hub.errors import CommandExpired, CommandFailed, EnvelopeError, HubError
from hub.hubs import hubs, live_hub_ids
from hub.routing import COMMAND_EXPIRE_TASK
from hub.storage import CommandRow
from tasks.application import app, context
from tasks.db import engine

log = logging.getLogger(__name__)

DEFAULT_TTL_S = 60.0


def send_command(
    device_id: str, name: str, args: dict[str, Any] | None = None, ttl: float = DEFAULT_TTL_S
) -> AsyncResult:
    """Send command `name` to `device_id`; the result completes with the device's answer.

    `ttl` is how long (seconds) the command may wait for the device to be
    connected and to answer; after it the result fails with `CommandExpired`.
    Works from any process that has the hub's settings: a task, a script, the CLI.
    """
    try:
        validate_device_id(device_id)
    except EnvelopeError as exc:
        raise HubError(str(exc)) from None
    if not name or not isinstance(name, str):
        raise HubError("a command needs a name")
    if ttl <= 0:
        raise HubError("ttl must be positive")
    command_id = uuid.uuid4().hex
    command, hub_id = create_command(engine(), command_id, device_id, name, args or {}, ttl)
    app.send_task(COMMAND_EXPIRE_TASK, args=(command_id, device_id, ttl), countdown=_countdown(ttl))
    if hub_id is None:
        hub_id = _external_bridge_hub()
    if hub_id is not None:
        with app.producer_or_acquire() as producer:
            producer.publish(
                command.to_dict(),
                exchange="",
                routing_key=downlink_queue(hub_id),
                serializer="json",
                retry=True,
                retry_policy={"max_retries": 3},
            )
    return AsyncResult(command_id, app=app)


def _countdown(ttl: float) -> float:
    """The expiry's countdown. Celery's native delayed delivery (quorum queues,
    docs/scaling.md) counts whole seconds and refuses less than one; a shorter
    time to live is reported expired after a second (the command itself stops
    being delivered at its time to live either way: `pending_commands`)."""
    if context().settings.broker_queue_type == "quorum":
        return max(ttl, 1.0)
    return ttl


def _external_bridge_hub() -> str | None:
    """A live hub that bridges an external MQTT broker, for a device no hub holds.

    Such a device may be connected to the external broker, which the hubs
    cannot see: one of these hubs (any one; they share the broker) publishes
    the command there (docs/mqtt.md, "External-broker mode").
    """
    bridging = [
        h.beat.hub_id
        for h in hubs(engine())
        if h.alive and any(x.get("name") == EXTERNAL_MQTT_LISTENER for x in h.beat.listeners)
    ]
    return random.choice(bridging) if bridging else None


def disconnect_device(device_id: str, reason: str) -> int:
    """Tell every live hub to reload the device's credential and drop its connection.

    Sent to all of them, not only the one holding the device: a hub that does
    not hold it still refreshes its cached hash, so the old credential stops
    working everywhere at once. Returns how many hubs were told.
    """
    hub_ids = live_hub_ids(engine())
    if not hub_ids:
        return 0
    with app.producer_or_acquire() as producer:
        for hub_id in hub_ids:
            producer.publish(
                disconnect_message(device_id, reason),
                exchange="",
                routing_key=downlink_queue(hub_id),
                serializer="json",
                retry=True,
                retry_policy={"max_retries": 3},
            )
    return len(hub_ids)


@app.task(name=COMMAND_EXPIRE_TASK, ignore_result=True, acks_late=True)
def expire(command_id: str, device_id: str, ttl: float) -> bool:
    """Fail a command nobody answered within its time to live."""
    if not finish_command(engine(), command_id, EXPIRED):
        return False
    error = CommandExpired(
        f"device {device_id!r} did not answer command {command_id} within {ttl:g} s"
    )
    app.backend.mark_as_failure(command_id, error, traceback=f"CommandExpired: {error}\n")
    return True


def complete_commands(envelopes: list[Envelope]) -> int:
    """Complete the results of the commands these answers are for; returns how many."""
    completed = 0
    for env in envelopes:
        payload = env.payload
        command_id = payload.get("command_id")
        if not isinstance(command_id, str):
            log.error("command result without a command id from %r", env.device_id)
            continue
        ok = bool(payload.get("ok"))
        if not finish_command(engine(), command_id, SUCCEEDED if ok else FAILED):
            log.info(
                "late or repeated answer to command %s from %r ignored", command_id, env.device_id
            )
            continue
        if ok:
            app.backend.mark_as_done(command_id, payload.get("result"))
        else:
            message = str(payload.get("error") or "the device reported an error")
            error = CommandFailed(f"device {env.device_id!r}: {message}")
            app.backend.mark_as_failure(
                command_id,
                error,
                traceback=f"CommandFailed: device {env.device_id!r} answered: {message}\n",
            )
        completed += 1
    return completed


#: A command still open this long after its time to live ran out lost its
#: `expire` task (a queue purged, a message dead-lettered): the sweep fails it.
EXPIRY_SWEEP_GRACE = timedelta(minutes=5)


def sweep_expired(now: datetime | None = None) -> int:
    """Expire the open commands whose time to live ended `EXPIRY_SWEEP_GRACE` ago;
    how many. Part of the periodic upkeep (tasks/upkeep.py); `expire` stays
    the usual path, and whichever runs first finishes the command."""
    now = now or datetime.now(UTC)
    table = CommandRow.__table__
    with engine().connect() as conn:
        stale = conn.execute(
            select(table.c.id, table.c.device_id, table.c.created_at, table.c.expires_at)
            .where(table.c.status.in_(OPEN), table.c.expires_at < now - EXPIRY_SWEEP_GRACE)
            .limit(10_000)
        ).all()
    ttl = {row.id: (row.expires_at - row.created_at).total_seconds() for row in stale}
    return sum(1 for row in stale if expire(row.id, row.device_id, ttl[row.id]))
