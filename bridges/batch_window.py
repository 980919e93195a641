"""How long the dispatcher keeps a new batch open: the batch window policy.

Layer: bridges; pure (no I/O, no event loop, no clock of its own: the caller
passes the time), so that it is tested alone (tests/unit/test_batch_window.py).

A task message costs the hub's publisher and the worker a fixed amount (a
publish and its confirm, a task run, a database commit) besides the cost of
each envelope in it. A hub under full load batches by itself: while the
publisher thread is busy, the open batch grows (bridges/dispatch.py). At a
moderate, steady load the thread is free again before the next envelope
arrives, and a fixed short window hands over batches of a few envelopes,
each paying the fixed cost. So the window follows the recent arrival rate:

- long enough for `target_messages` to arrive at that rate,
- never longer than `max_window_s` (the latency the operator grants), and
- zero when fewer than one more envelope is expected within `max_window_s`
  (a quiet hub): waiting would only add latency.

The rate is a decayed count of arrivals (time constant `horizon_s`), updated
each time a batch opens with the envelopes that arrived since the last one,
so the dispatcher pays no clock reading per envelope.
"""

from __future__ import annotations

import math

__all__ = ["BatchWindow"]


class BatchWindow:
    """Picks the window of each new batch from the recent arrival rate."""

    def __init__(self, target_messages: int, max_window_s: float, horizon_s: float = 0.25) -> None:
        if target_messages < 1:
            raise ValueError("target_messages must be at least 1")
        if max_window_s < 0 or horizon_s <= 0:
            raise ValueError("max_window_s must be >= 0 and horizon_s > 0")
        self._target = float(target_messages)
        self._max = max_window_s
        self._horizon = horizon_s
        self._count = 0.0  # arrivals, each decayed by exp(-age / horizon)
        self._at: float | None = None

    def rate(self, now: float) -> float:
        """Recent arrivals per second (as of the last `opened`, decayed to `now`)."""
        return self._decayed(now) / self._horizon

    def opened(self, now: float, arrived: int) -> float:
        """A batch opens at `now`; `arrived` envelopes came since the previous call.
        Returns the seconds it should stay open (0: hand it over once the loop is idle)."""
        self._count = self._decayed(now) + arrived
        self._at = now
        if self._max <= 0:
            return 0.0
        rate = self._count / self._horizon
        if rate * self._max < 1.0:
            return 0.0
        return min(self._max, self._target / rate)

    def _decayed(self, now: float) -> float:
        if self._at is None:
            return 0.0
        age = max(0.0, now - self._at)
        return self._count * math.exp(-age / self._horizon)
