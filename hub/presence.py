"""The order in which device messages and presence apply.

Layer: core; imports only `hub.envelope`. Presence envelopes are made by
`hub.uplink.presence_envelope`.

Workers store batches in any order: presence, telemetry and state travel on
separate queues, several workers take batches in parallel, and a spool replays
old batches late. So a device's stored state cannot follow the order in which
batches happen to be stored; it follows the order of these stamps instead
(docs/delivery.md, "Order of state and presence"):

- A presence envelope names the connection it concerns by `since`, the time
  that connection was accepted. Presence is ordered by (since, event time): a
  disconnect always wins over its own connect and over anything earlier, and
  the connect of a newer connection (to this hub or another) wins over a late
  disconnect of an older one.
- A telemetry or state message marks its device online only when it was
  received after the newest presence event applied.
- Last values and state are merged key by key in the order of the messages'
  device time (the hub's receive time where the device gives none), then
  sequence number; an older message never overwrites a newer value.

Hubs that share one database must keep their clocks synchronised (NTP): the
stamps of different hubs are compared.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hub.envelope import Envelope

#: A sortable text stamp: the order of a message, comparable as a string.
Stamp = str


def presence_since(envelope: Envelope) -> datetime:
    """When the connection a presence envelope concerns was accepted.

    Envelopes from before `since` existed (or with a bad value) count as
    concerning a connection that started at the event itself.
    """
    raw: Any = envelope.payload.get("since")
    if isinstance(raw, str):
        try:
            parsed = datetime.fromisoformat(raw)
        except ValueError:
            return envelope.received_at
        if parsed.tzinfo is not None:
            return parsed.astimezone(UTC)
    return envelope.received_at


def _text(moment: datetime) -> str:
    # Fixed width, UTC: string order is time order.
    utc = moment.astimezone(UTC)
    if utc.year < 1000:
        # strftime writes such a year without its leading zeros; stamps stored
        # so before must still compare the same.
        return utc.strftime("%Y-%m-%dT%H:%M:%S.%f")
    # The same text as strftime("%Y-%m-%dT%H:%M:%S.%f") (less the "+00:00"), at
    # a fraction of its cost: this runs for every message stored.
    return utc.isoformat(timespec="microseconds")[:-6]


def message_stamp(envelope: Envelope) -> Stamp:
    """The order of a telemetry or state message: device time, then sequence."""
    moment = envelope.device_time or envelope.received_at
    seq = envelope.seq if envelope.seq is not None else 0
    return f"{_text(moment)}|{seq:020d}"


def presence_stamp(since: datetime, at: datetime) -> Stamp:
    """The order of a presence event: the connection's start, then the event's time."""
    return f"{_text(since)}|{_text(at)}"


def merge_ordered(
    values: dict[str, Any], stamps: dict[str, Stamp], payload: dict[str, Any], stamp: Stamp
) -> bool:
    """Merge `payload` into `values` where it is newer than each key's stamp.

    A key without a stamp (stored before stamps existed) is older than any
    message. Returns whether anything changed.
    """
    changed = False
    for key, value in payload.items():
        if stamp > stamps.get(key, ""):
            values[key] = value
            stamps[key] = stamp
            changed = True
    return changed
