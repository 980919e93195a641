"""Dispatch: envelopes in, durable Celery task messages out.

Layer: bridges; imports the `hub` core only (tasks are sent by name).

The event loop never waits on the broker. `submit()` appends the envelope to
the open batch of its kind and returns a future. A batch is handed to the
publisher thread when its window has passed or when it is full; while the
thread is still busy with the previous batch, the open batch keeps growing, so
batches grow with load. The window follows the recent arrival rate
(bridges/batch_window.py): zero when the hub is quiet (the batch goes once the
loop is idle, a `call_soon` after the reads of one loop turn), up to
`batch_window_ms` at a moderate load, so that more envelopes share the fixed
cost of a task message. See docs/delivery.md.

The publisher thread owns one broker connection with publisher confirms. A
batch is one task message (its envelopes as a list); when RabbitMQ confirms
it, every envelope's future resolves and the bridges acknowledge the devices
(`submit_batched` hands out one future per batch instead, shared by the
envelopes submitted that way: the MQTT fast path's, bridges.mqtt.tap).
When RabbitMQ is unreachable the batch goes to the local spool instead, which
also resolves the futures; spooled batches are replayed in order once the
broker is back, and new batches queue behind them. When the spool is full the
thread waits, the futures stay pending, and devices stop being acknowledged.

A hung broker (a partition, a stopped process: no connection reset) counts
as unreachable: every blocking step is bounded by `broker_confirm_timeout_s`
and AMQP heartbeats (`broker_heartbeat_s`) notice a silent broker while idle.
A batch whose confirm timed out may still have been delivered; it is spooled
and delivered again (at least once; the tasks deduplicate by envelope id).
Replay merges consecutive spooled batches into large task messages and
publishes them with pipelined confirms (many messages, then one wait).

Every envelope accepted and not yet durable counts in `room`
(bridges.backpressure): once `dispatch_max_pending_messages` wait, the device
connections stop reading until half of them are durable. That one bound
covers the open batches, the batches handed to the thread and a batch waiting
for room in a full spool (docs/delivery.md, "Bounds and backpressure").
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any

from bridges.backpressure import Room
from bridges.batch_window import BatchWindow
from bridges.publisher import STOP, Batch, Publisher, check_broker, publisher_app
from hub.envelope import Envelope, Kind
from hub.errors import DispatchError
from hub.metrics import Metrics
from hub.settings import Settings

__all__ = ["Dispatcher", "check_broker", "publisher_app"]

log = logging.getLogger(__name__)


class Dispatcher:
    """Batches envelopes and makes them durable without blocking the event loop."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._app = publisher_app(settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open: dict[Kind, Batch] = {}
        self._flush_scheduled = False
        self._thread_busy = 0  # batches handed over and not yet done
        self._handoff: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._not_durable_at_stop = 0
        self._stop_requested = threading.Event()
        self._max = settings.batch_max_messages
        # At least two full batches: one with the thread, one filling.
        self.room = Room(
            max(settings.dispatch_max_pending_messages, 2 * self._max),
            on_full=metrics.dispatch_full.inc,
        )
        # Read at each scrape: no gauge update (and its lock) per envelope.
        metrics.dispatch_pending.set_function(lambda: self.room.pending)
        self._window = BatchWindow(settings.batch_target_messages, settings.batch_window_ms / 1000)
        self._arrived = 0  # envelopes since the window was last asked

    # -- event loop side ---------------------------------------------------

    async def start(self) -> None:
        from bridges.spool import Spool

        self._loop = asyncio.get_running_loop()
        # Opening the spool reads its size; keep that disk access off the loop.
        spool = await asyncio.to_thread(
            Spool, self._settings.spool_path, self._settings.spool_max_messages
        )
        self._metrics.spool_size.set(spool.messages)
        publisher = Publisher(self._app, spool, self._settings, self._metrics, self._stop_requested)
        self._thread = threading.Thread(
            target=publisher.run,
            args=(self._handoff, self._loop, self._done),
            name="hub-dispatch",
            daemon=True,
        )
        self._thread.start()

    def submit(self, envelope: Envelope) -> asyncio.Future[None]:
        """Queue `envelope`; the future resolves once it is durable (see module doc)."""
        loop = self._loop
        if loop is None or self._stopping:
            raise DispatchError("the dispatcher is not running")
        future: asyncio.Future[None] = loop.create_future()
        batch = self._batch_for(envelope)
        batch.futures.append(future)
        self._added(batch, loop)
        return future

    def submit_batched(self, envelope: Envelope) -> asyncio.Future[None]:
        """`submit`, but the future returned is the batch's own, shared by every
        envelope submitted this way into the same batch: one future and one
        resolution per batch instead of per envelope. It resolves once this
        envelope (with its batch) is durable. Nobody may cancel it."""
        loop = self._loop
        if loop is None or self._stopping:
            raise DispatchError("the dispatcher is not running")
        batch = self._batch_for(envelope)
        shared = batch.shared
        if shared is None:
            shared = batch.shared = loop.create_future()
        self._added(batch, loop)
        return shared

    def _batch_for(self, envelope: Envelope) -> Batch:
        batch = self._open.get(envelope.kind)
        if batch is None:
            batch = self._open[envelope.kind] = Batch(envelope.kind)
        batch.envelopes.append(envelope)
        self.room.taken()
        return batch

    def _added(self, batch: Batch, loop: asyncio.AbstractEventLoop) -> None:
        self._arrived += 1
        if len(batch.envelopes) >= self._max:
            self._hand_over(self._open.pop(batch.kind))
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            window = self._window.opened(loop.time(), self._arrived)
            self._arrived = 0
            if window > 0:
                loop.call_later(window, self._flush)
            else:
                loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        # Adaptive batching: while the thread still works on a batch, keep the
        # open ones growing; `_done` flushes again when the thread is free.
        if self._thread_busy > 0:
            return
        self.flush_all()

    def flush_all(self) -> None:
        for kind in list(self._open):
            self._hand_over(self._open.pop(kind))

    def _hand_over(self, batch: Batch) -> None:
        self._thread_busy += 1
        self._handoff.put(batch)

    def _done(self, batch: Batch, error: BaseException | None) -> None:
        """Called on the loop when the thread has made a batch durable (or given up)."""
        self._thread_busy -= 1
        self.room.released(len(batch.envelopes))
        failed = 0
        shared = batch.shared
        if shared is not None and not shared.done():
            if error is None:
                shared.set_result(None)
            else:
                shared.set_exception(error)
                shared.exception()  # retrieved: reported once, as below
                failed += len(batch.envelopes) - len(batch.futures)
        for future in batch.futures:
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
                # Retrieved here: a bridge whose connection is gone no longer
                # awaits it, and asyncio would log each one as never retrieved.
                # The failure is reported once, by `stop()` or the thread.
                future.exception()
                failed += 1
        if failed and self._stopping:
            self._not_durable_at_stop += failed
        if self._open and self._thread_busy == 0 and not self._flush_scheduled:
            self.flush_all()

    @property
    def pending(self) -> int:
        """Envelopes accepted and not yet durable (open batches and those with the thread)."""
        return self.room.pending

    async def stop(self) -> None:
        """Make everything accepted so far durable, then stop the thread."""
        if self._thread is None or self._stopping:
            return
        self.flush_all()
        self._stopping = True
        self._stop_requested.set()
        self._handoff.put(STOP)
        await asyncio.to_thread(self._thread.join)
        # Let the thread's last call_soon_threadsafe callbacks run.
        await asyncio.sleep(0)
        self._thread = None
        if self._not_durable_at_stop:
            log.warning(
                "stopped with %d messages not made durable (spool full and RabbitMQ "
                "unreachable); they were not acknowledged, their devices send them again",
                self._not_durable_at_stop,
            )
