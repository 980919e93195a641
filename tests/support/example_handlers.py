"""Example user handlers, loaded by the test worker through the `handlers` setting.

They match only device ids with `-hot-` or `-boom-` in them, so the other
tests' devices never reach them.
"""

from __future__ import annotations

from hub.envelope import Envelope
from tasks import send_command
from tasks.handlers import handler

THRESHOLD_C = 30.0


@handler(kind="telemetry", devices="*-hot-*")
def slow_down_when_hot(envelope: Envelope) -> None:
    """Command a device to report every 5 s once its temperature crosses the threshold."""
    if float(envelope.payload.get("temperature", 0)) > THRESHOLD_C:
        send_command(envelope.device_id, "set_interval", {"seconds": 5}, ttl=60)


@handler(kind="telemetry", devices="*-boom-*")
def always_raises(envelope: Envelope) -> None:
    raise RuntimeError(f"handler bug triggered by {envelope.device_id}")
