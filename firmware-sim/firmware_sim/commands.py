"""The simulated device's own state, and the commands a simulated device answers.

Layer: firmware simulator; imports the hub core only (nothing at all here),
never bridges or tasks.

Both transports answer commands the same way: they hand the command's name and
arguments to `answer()` and send back the `CommandAnswer`, as a COMMAND_RESULT
frame (TCP) or a JSON message on `devices/<id>/commands/<command id>/result`
(MQTT). The handlers are plain functions of the device state, so they can be
tested without any network.

Commands:

- `ping` -> `{"pong": true, "device": <id>, "uptime_s": <seconds since start>}`
- `set_interval` `{"seconds": <positive number>}` -> changes how often the
  device sends telemetry; answers `{"interval_s": <seconds>}`
- `fail` -> always fails with "failed on purpose" (to test error paths)
- `get_state` -> the device's simulated state
- anything else fails with "unknown command <name>"
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "COMMANDS",
    "FIRMWARE_VERSION",
    "CommandAnswer",
    "CommandFailed",
    "SimState",
    "answer",
]

FIRMWARE_VERSION = "firmware-sim/1"


@dataclass
class SimState:
    """What a simulated device knows about itself.

    `interval_s` is the telemetry interval; None means "as fast as the
    acknowledgement window allows". The transports read it before each message,
    so `set_interval` takes effect at once.
    """

    device_id: str
    boot_id: int
    interval_s: float | None = None
    clock: Callable[[], float] = time.monotonic
    started_at: float = field(default=0.0)
    temperature: float = 21.0
    humidity: float = 45.0
    battery: float = 100.0
    sent: int = 0
    acknowledged: int = 0

    def __post_init__(self) -> None:
        if not self.started_at:
            self.started_at = self.clock()

    def uptime_s(self) -> float:
        return max(0.0, self.clock() - self.started_at)

    def next_reading(self, rng: random.Random) -> dict[str, float]:
        """The next measurements: a bounded random walk, so stored values look plausible."""
        self.temperature = min(40.0, max(0.0, self.temperature + rng.gauss(0.0, 0.2)))
        self.humidity = min(100.0, max(0.0, self.humidity + rng.gauss(0.0, 0.5)))
        # The battery drains slowly and never recovers, as a real one would.
        self.battery = max(0.0, self.battery - rng.random() * 0.01)
        return {
            "temperature": round(self.temperature, 2),
            "humidity": round(self.humidity, 1),
            "battery": round(self.battery, 2),
        }

    def snapshot(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "boot_id": self.boot_id,
            "firmware": FIRMWARE_VERSION,
            "uptime_s": round(self.uptime_s(), 3),
            "interval_s": self.interval_s,
            "values": {
                "temperature": round(self.temperature, 2),
                "humidity": round(self.humidity, 1),
                "battery": round(self.battery, 2),
            },
            "sent": self.sent,
            "acknowledged": self.acknowledged,
        }


@dataclass(frozen=True, slots=True)
class CommandAnswer:
    """The outcome of one command: a result when `ok`, else an error message."""

    ok: bool
    result: Any = None
    error: str = ""

    def to_json_object(self) -> dict[str, Any]:
        """The MQTT result payload.

        `{"ok": true, "result": ...}` or `{"ok": false, "error": "..."}`; the TCP
        protocols carry the same fields in a COMMAND_RESULT frame.
        """
        if self.ok:
            return {"ok": True, "result": self.result}
        return {"ok": False, "error": self.error}


class CommandFailed(Exception):
    """Raised by a command handler; its message becomes the answer's error."""


Handler = Callable[[SimState, Mapping[str, Any]], Any]


def ping(state: SimState, args: Mapping[str, Any]) -> dict[str, Any]:
    return {"pong": True, "device": state.device_id, "uptime_s": round(state.uptime_s(), 3)}


def set_interval(state: SimState, args: Mapping[str, Any]) -> dict[str, Any]:
    seconds = args.get("seconds")
    # bool is an int subclass; `{"seconds": true}` is a mistake, not one second.
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or seconds <= 0
    ):
        raise CommandFailed('set_interval needs args {"seconds": <positive number>}')
    state.interval_s = float(seconds)
    return {"interval_s": state.interval_s}


def fail(state: SimState, args: Mapping[str, Any]) -> Any:
    raise CommandFailed("failed on purpose")


def get_state(state: SimState, args: Mapping[str, Any]) -> dict[str, Any]:
    return state.snapshot()


COMMANDS: Mapping[str, Handler] = {
    "ping": ping,
    "set_interval": set_interval,
    "fail": fail,
    "get_state": get_state,
}


def answer(state: SimState, name: str, args: Mapping[str, Any] | None = None) -> CommandAnswer:
    """Run command `name` against `state`; never raises for a bad command."""
    handler = COMMANDS.get(name)
    if handler is None:
        return CommandAnswer(ok=False, error=f"unknown command {name}")
    if args is None:
        args = {}
    if not isinstance(args, Mapping):
        return CommandAnswer(ok=False, error=f"{name}: args must be an object")
    try:
        return CommandAnswer(ok=True, result=handler(state, args))
    except CommandFailed as exc:
        return CommandAnswer(ok=False, error=str(exc))
