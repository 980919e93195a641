"""The publisher thread: task messages to RabbitMQ with publisher confirms, or to the spool.

Layer: bridges; imports the `hub` core only (tasks are sent by name).

`bridges.dispatch.Dispatcher` (the event loop's side) hands full batches to
`Publisher.run`, a thread of its own that owns the broker connection. A batch
is one task message; when RabbitMQ confirms it, the batch's futures resolve
on the loop. When RabbitMQ is unreachable or does not confirm within
`broker_confirm_timeout_s`, the batch goes to the local spool, which also
resolves them; spooled batches are replayed in order, merged and pipelined,
once the broker is back. See docs/delivery.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from kombu import Connection

from bridges.queues import celery_queues, connect, undeliverable_queue
from hub.envelope import Envelope, Kind
from hub.errors import ConfigError, DispatchError
from hub.metrics import Metrics
from hub.routing import INGEST_TASKS, QUEUES, exchange_for, task_routes
from hub.settings import Settings

log = logging.getLogger(__name__)

#: How many spooled rows one replay round reads (merged into fewer task messages).
_REPLAY_ROWS = 256


@dataclass(slots=True)
class Batch:
    kind: Kind
    envelopes: list[Envelope] = field(default_factory=list)
    futures: list[asyncio.Future[None]] = field(default_factory=list)
    #: One future for every envelope submitted with `Dispatcher.submit_batched`
    #: (None until the first): resolved with the batch, like `futures`.
    shared: asyncio.Future[None] | None = None

    def body(self) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.envelopes]


STOP = object()


def publisher_app(settings: Settings) -> Celery:
    """A Celery app used only to format and publish task messages by name."""
    app = Celery("hub-dispatch", set_as_current=False)
    transport_options: dict[str, Any] = {}
    if not settings.embedded:
        # Confirms are ours (`Confirms`: confirm mode on the channel, pipelined
        # waits), not py-amqp's confirm_publish, which waits after every message.
        # Socket timeouts bound every other read and write: a hung broker must
        # never block the thread for longer than the confirm timeout.
        transport_options["read_timeout"] = settings.broker_confirm_timeout_s
        transport_options["write_timeout"] = settings.broker_confirm_timeout_s
    exchange, exchange_type = exchange_for(settings.broker_queue_type)
    app.conf.update(
        # Several nodes (`a;b;c`): each connect tries them in turn (bridges.queues.connect).
        broker_url=settings.effective_broker_url,
        broker_transport_options=transport_options,
        broker_connection_timeout=min(2.0, settings.broker_confirm_timeout_s),
        broker_heartbeat=settings.broker_heartbeat_s or None,
        task_serializer="json",
        accept_content=["json"],
        task_queues=celery_queues(settings),
        task_default_exchange=exchange,
        task_default_exchange_type=exchange_type,
        task_routes=task_routes(),
        task_default_delivery_mode="persistent",
    )
    return app


def check_broker(settings: Settings) -> None:
    """Connect once to the task broker; a ConfigError that says what is wrong if we cannot.

    Refused credentials or an unknown vhost are always configuration errors.
    An unreachable broker is one only when `start_without_broker` is off: a
    hub restarted during a RabbitMQ outage may be told to start and spool.
    """
    if settings.embedded:
        return
    url = settings.effective_broker_url
    # Each node's address, never its credentials.
    shown = ";".join(node.split("@", 1)[-1] for node in settings.broker_nodes)
    try:
        with Connection(url, connect_timeout=3) as connection:
            connect(connection)
            channel = connection.channel()
            for declared in _declarations(settings):
                declared(channel).declare()
    except Exception as exc:  # boundary: classify whatever the client raised
        text = str(exc)
        if "PRECONDITION_FAILED" in text:
            raise ConfigError(
                f"RabbitMQ at {shown} has the hub's queues of another type or with other "
                f"arguments ({text.split(' - ', 1)[-1]}); broker_queue_type / "
                "HUB_BROKER_QUEUE_TYPE must match them, or drain and delete them first "
                '(docs/scaling.md, "Caveats")',
                key="broker_queue_type",
                env="HUB_BROKER_QUEUE_TYPE",
            ) from None
        if "ACCESS_REFUSED" in text or "NOT_ALLOWED" in text:
            raise ConfigError(
                f"RabbitMQ at {shown} refused the hub: {text.split(' - ', 1)[-1]}; "
                "check the user, password and vhost in broker_url / HUB_BROKER_URL",
                key="broker_url",
                env="HUB_BROKER_URL",
            ) from None
        if settings.start_without_broker:
            log.warning(
                "RabbitMQ at %s is unreachable (%s); starting anyway, spooling", shown, text
            )
            return
        raise ConfigError(
            f"RabbitMQ at {shown} is unreachable ({text}); start it, fix broker_url / "
            "HUB_BROKER_URL, or set HUB_START_WITHOUT_BROKER=true to start and spool",
            key="broker_url",
            env="HUB_BROKER_URL",
        ) from None


def _declarations(settings: Settings) -> list[Any]:
    """What the publisher declares on each connect: the hub's queues, and with
    quorum queues the one they dead-letter into."""
    declared: list[Any] = list(celery_queues(settings))
    undeliverable = undeliverable_queue(settings)
    if undeliverable is not None:
        declared.append(undeliverable)
    return declared


class Confirms:
    """Publisher confirms of one channel, for publishing many messages before one wait.

    The channel is put in confirm mode here; RabbitMQ then numbers every
    publish on it from 1 (its delivery tag) and acknowledges tags, one or
    `multiple` up to one, or refuses them (nack).
    """

    def __init__(self, connection: Connection, channel: Any) -> None:
        self._connection = connection
        channel.confirm_select()
        channel.events["basic_ack"].add(self._ack)
        channel.events["basic_nack"].add(self._nack)
        self.published = 0
        self._acked_upto = 0
        self._acked: set[int] = set()
        self._nacked = False

    def _ack(self, delivery_tag: int, multiple: bool) -> None:
        if multiple:
            self._acked_upto = max(self._acked_upto, delivery_tag)
        else:
            self._acked.add(delivery_tag)
        while self._acked_upto + 1 in self._acked:
            self._acked_upto += 1
            self._acked.discard(self._acked_upto)

    def _nack(self, delivery_tag: int, multiple: bool) -> None:
        self._nacked = True

    def wait_all(self, timeout_s: float) -> None:
        """Wait until everything published so far is confirmed; raise on nack or timeout."""
        deadline = time.monotonic() + timeout_s
        while self._acked_upto < self.published:
            if self._nacked:
                raise DispatchError("RabbitMQ refused a message (negative confirm)")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DispatchError(f"no publisher confirm within {timeout_s:g} s")
            try:
                self._connection.drain_events(timeout=remaining)
            except TimeoutError:
                raise DispatchError(f"no publisher confirm within {timeout_s:g} s") from None
        if self._nacked:
            raise DispatchError("RabbitMQ refused a message (negative confirm)")


@dataclass(frozen=True, slots=True)
class Message:
    task_name: str
    queue: str
    body: Sequence[Any]


class Publisher:
    """The publisher thread: owns the broker connection and the spool."""

    def __init__(
        self,
        app: Celery,
        spool: Any,
        settings: Settings,
        metrics: Metrics,
        stop_requested: threading.Event,
    ) -> None:
        self._app = app
        self._stop_requested = stop_requested
        self._spool = spool
        self._settings = settings
        self._metrics = metrics
        self._connection: Connection | None = None
        self._producer: Any = None
        self._confirms: Confirms | None = None
        self._next_attempt = 0.0
        self._next_keepalive = 0.0
        self._down_logged = False

    # -- broker connection -------------------------------------------------

    def _connected(self) -> bool:
        if self._connection is not None:
            return True
        now = time.monotonic()
        if now < self._next_attempt:
            return False
        self._next_attempt = now + self._settings.broker_retry_interval_s
        connection: Connection | None = None
        try:
            connection = self._app.connection_for_write(
                heartbeat=None
                if self._settings.embedded
                else (self._settings.broker_heartbeat_s or None)
            )
            # One quick attempt per listed node: kombu's retrying connect would
            # sleep here and stall the spool; the retry cadence is ours
            # (broker_retry_interval_s).
            connect(connection)
            channel = connection.default_channel
            for declared in _declarations(self._settings):
                declared(channel).declare()
            # The embedded default's local queue (SQLAlchemy) has no confirms: its
            # publish is a committed insert, durable when it returns.
            confirms = None if self._settings.embedded else Confirms(connection, channel)
            self._producer = self._app.amqp.Producer(channel, auto_declare=False)
        except Exception as exc:  # boundary: any broker failure means "unreachable"
            self._connection = connection
            self._mark_down(exc)
            return False
        self._connection = connection
        self._confirms = confirms
        self._next_keepalive = time.monotonic() + self._keepalive_interval()
        self._metrics.broker_connected.set(1)
        if self._down_logged:
            log.info("task broker reachable again; replaying %d spooled", self._spool.messages)
        self._down_logged = False
        return True

    def _mark_down(self, exc: BaseException) -> None:
        if self._connection is not None:
            # collect(), not release(): closing properly is a handshake, which a
            # hung broker would never answer.
            with contextlib.suppress(Exception):  # already broken; nothing to save
                self._connection.collect()
        self._connection = None
        self._producer = None
        self._confirms = None
        self._metrics.broker_connected.set(0)
        if not self._down_logged:
            log.warning("task broker unreachable (%s); spooling locally", exc)
            self._down_logged = True

    def _keepalive_interval(self) -> float:
        if self._settings.embedded or not self._settings.broker_heartbeat_s:
            return 0.0
        return self._settings.broker_heartbeat_s / 2

    def _keepalive(self) -> None:
        """Read what the broker sent (its heartbeats) and send ours; notice a silent broker."""
        interval = self._keepalive_interval()
        if self._connection is None or not interval or time.monotonic() < self._next_keepalive:
            return
        self._next_keepalive = time.monotonic() + interval
        try:
            with contextlib.suppress(TimeoutError):
                self._connection.drain_events(timeout=0.01)
            self._connection.heartbeat_check(rate=2)
        except Exception as exc:  # boundary: missed heartbeats, a closed socket
            self._mark_down(exc)

    def _publish(self, messages: Sequence[Message]) -> bool:
        """Publish all, then wait once for all confirms; False (and disconnected) on failure."""
        if not messages or not self._connected():
            return False
        timeout = self._settings.broker_confirm_timeout_s
        try:
            for message in messages:
                self._app.send_task(
                    message.task_name,
                    args=(message.body,),
                    task_id=uuid.uuid4().hex,
                    producer=self._producer,
                    queue=message.queue,
                    retry=False,
                    timeout=timeout,
                    # Celery would otherwise saferepr() the whole batch for its headers.
                    argsrepr=f"[<{len(message.body)} envelopes>]",
                    kwargsrepr="{}",
                )
                if self._confirms is not None:
                    self._confirms.published += 1
            if self._confirms is not None:
                self._confirms.wait_all(timeout)
        except Exception as exc:  # boundary: connection loss, nack, confirm timeout
            self._mark_down(exc)
            return False
        self._next_keepalive = time.monotonic() + self._keepalive_interval()
        return True

    # -- the loop of the thread --------------------------------------------

    def _wait_s(self) -> float | None:
        waits = []
        if self._spool.messages:
            waits.append(self._settings.broker_retry_interval_s)
        if self._connection is not None and self._keepalive_interval():
            waits.append(self._keepalive_interval())
        return min(waits) if waits else None

    def run(self, handoff: queue.Queue[Any], loop: asyncio.AbstractEventLoop, done: Any) -> None:
        stopping = False
        while True:
            try:
                item = handoff.get(timeout=self._wait_s()) if not stopping else handoff.get_nowait()
            except queue.Empty:
                item = None
                if stopping:
                    break
            if item is STOP:
                stopping = True
            elif item is not None:
                error = self._make_durable(item)
                loop.call_soon_threadsafe(done, item, error)
            self._keepalive()
            self._replay()
        if self._connection is not None:
            with contextlib.suppress(Exception):  # a broker gone at shutdown
                self._connection.release()
        self._spool.close()

    def _make_durable(self, batch: Batch) -> BaseException | None:
        task_name = INGEST_TASKS[batch.kind]
        queue_name = QUEUES[batch.kind]
        body = batch.body()
        count = len(body)
        if self._spool.messages == 0 and self._publish([Message(task_name, queue_name, body)]):
            self._metrics.batches_published.inc()
            self._metrics.envelopes_published.inc(count)
            return None
        # The broker is away (or older batches wait in the spool: keep order).
        text = json.dumps(body, separators=(",", ":"))
        while not self._spool.has_room(count):
            # Backpressure: nothing is acknowledged until there is room again.
            self._replay()
            if self._spool.has_room(count):
                break
            if self._stop_requested.is_set():
                # Shutting down with a full spool and no broker: these stay
                # unacknowledged and the devices will send them again.
                return DispatchError("spool full and broker unreachable at shutdown")
            time.sleep(min(self._settings.broker_retry_interval_s, 0.5))
        try:
            self._spool.append(task_name, queue_name, text, count)
        except Exception as exc:  # boundary: a disk failure must fail these futures, not hang them
            log.exception("could not spool a batch of %d", count)
            return DispatchError(f"could not spool: {exc}")
        self._metrics.envelopes_spooled.inc(count)
        self._metrics.spool_size.set(self._spool.messages)
        return None

    def _replay(self) -> None:
        """Publish spooled batches oldest first: merged, then confirmed together."""
        if not self._spool.messages or not self._connected():
            return
        rows = self._spool.oldest(_REPLAY_ROWS)
        limit = self._settings.spool_replay_batch_messages
        messages: list[Message] = []
        for row in rows:
            body = json.loads(row.body)
            last = messages[-1] if messages else None
            # Merge only neighbours of one task: order within a queue is kept.
            if (
                last is not None
                and (last.task_name, last.queue) == (row.task_name, row.queue)
                and len(last.body) + len(body) <= limit
            ):
                assert isinstance(last.body, list)
                last.body.extend(body)
            else:
                messages.append(Message(row.task_name, row.queue, body))
        if not self._publish(messages):
            return
        # Only after every confirm: a crash before this line replays them again.
        self._spool.remove_many(rows)
        self._metrics.batches_published.inc(len(messages))
        self._metrics.envelopes_published.inc(sum(row.count for row in rows))
        self._metrics.spool_size.set(self._spool.messages)
        if not self._spool.messages:
            log.info("spool replayed")
