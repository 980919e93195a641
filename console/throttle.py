"""Slowing down repeated failed logins, per user name and per client address.

Layer: console; pure (no I/O), so unit tests drive it with a fake clock.

After `free` failures in a row for a key, each further attempt must wait:
1 s, then 2, 4, ... up to `max_wait_s`. A success clears the key. The state is
kept in the console process: a restart forgives, and several console
processes each count their own (argon2's cost still bounds guessing).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class LoginThrottle:
    free: int = 5
    max_wait_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _failures: dict[str, tuple[int, float]] = field(default_factory=dict)

    def wait_s(self, *keys: str) -> float:
        """Seconds before another attempt is allowed for these keys (0: now)."""
        now = self.clock()
        waits = [0.0]
        for key in keys:
            count, last = self._failures.get(key, (0, 0.0))
            if count >= self.free:
                delay = min(2.0 ** (count - self.free), self.max_wait_s)
                waits.append(last + delay - now)
        return max(waits)

    def failed(self, *keys: str) -> None:
        now = self.clock()
        for key in keys:
            count, _ = self._failures.get(key, (0, 0.0))
            self._failures[key] = (count + 1, now)
        if len(self._failures) > 100_000:  # bounded: forget the oldest half
            for key, _ in sorted(self._failures.items(), key=lambda kv: kv[1][1])[:50_000]:
                del self._failures[key]

    def succeeded(self, *keys: str) -> None:
        for key in keys:
            self._failures.pop(key, None)
