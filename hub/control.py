"""Control messages to hub processes, on the commands' path (each hub's downlink queue).

Layer: core; imports nothing from the project.

A command goes to a device; a control message goes to the hub itself. The one
kind so far is `disconnect`: a device was re-keyed or removed, so each hub
reloads its cached credential hash from the registry and drops the device's
connection on every transport. The device can then only come back with its
new credential. Control messages are told apart from commands by their
`control` key; a hub that does not know a control kind logs and drops it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DISCONNECT = "disconnect"


@dataclass(frozen=True, slots=True)
class Disconnect:
    device_id: str
    reason: str


def disconnect_message(device_id: str, reason: str) -> dict[str, Any]:
    return {"control": DISCONNECT, "device_id": device_id, "reason": reason}


def is_control(body: Any) -> bool:
    return isinstance(body, dict) and "control" in body


def parse_control(body: dict[str, Any]) -> Disconnect | None:
    """The control message in `body`, or None when its kind is unknown or it is malformed."""
    if body.get("control") != DISCONNECT or not isinstance(body.get("device_id"), str):
        return None
    return Disconnect(body["device_id"], str(body.get("reason") or ""))
