"""The worker's JSON decoder for task messages: bounded depth, poison quarantined.

Layer: tasks; imports the `hub` core and kombu only.

The hub never sends an envelope nested deeper than the envelope's limit
(hub.payloads), but a task message can come from elsewhere: an older hub, a
spool written before the limit, another producer. A prefork worker pickles
each decoded task body to hand it to a pool process, and Python's pickler
gives up near 480 levels; the exception escapes Celery's consumer and the
worker exits, then the next worker takes the same message and dies too. So
the worker decodes task bodies with this decoder (registered as kombu's
"json"): a body that nests deeper than `WIRE_MAX_DEPTH` has each too-deep
envelope of its batch (or a handler run's envelope) replaced by a quarantine
marker, which the task sends to the dead letters while it stores the rest.
A deep body of any other shape is a decode error, which
`tasks.consumer.HubConsumer` records as a dead letter instead of dropping it.
"""

from __future__ import annotations

import json
from typing import Any, Final

from kombu import serialization
from kombu.utils import json as kombu_json

from hub.payloads import MAX_PAYLOAD_DEPTH_CEILING, exceeds_depth, parsed_text_exceeds_depth

#: Deepest task body accepted as is: the envelope limit plus the body's own
#: levels ([args, kwargs, embed], the batch list, the envelope dict), with room.
WIRE_MAX_DEPTH: Final = 100
#: An item of a batch deeper than this cannot be a valid envelope.
ENVELOPE_MAX_DEPTH: Final = MAX_PAYLOAD_DEPTH_CEILING + 1
#: The key that marks a quarantined item (never a key of a real envelope dict).
QUARANTINE_KEY: Final = "__hub_quarantined__"
#: Stored text of a quarantined item is cut here.
_RAW_CHARS: Final = 64 * 1024


def quarantined(item: Any) -> dict[str, Any]:
    """The marker that replaces an item too deep to hand on."""
    summary: dict[str, Any] = {QUARANTINE_KEY: "too_deep"}
    if isinstance(item, dict):
        # The envelope's own scalar fields say whose it was; its payload is
        # what is too deep, so only a cut repr of it is kept.
        for key in ("id", "device_id", "kind", "seq", "received_at", "transport", "protocol"):
            value = item.get(key)
            if isinstance(value, (str, int)) and not isinstance(value, bool):
                summary[key] = value
    try:
        summary["raw"] = repr(item)[:_RAW_CHARS]
    except RecursionError:
        summary["raw"] = "(too deep to show)"
    return summary


def _quarantine_items(items: list[Any]) -> None:
    for i, item in enumerate(items):
        if exceeds_depth(item, ENVELOPE_MAX_DEPTH):
            items[i] = quarantined(item)


def guard(body: Any) -> Any:
    """`body` with too-deep envelopes quarantined; ValueError if it stays too deep."""
    if not exceeds_depth(body, WIRE_MAX_DEPTH):
        return body
    # Celery's protocol 2 body: [args, kwargs, embed]. Ingest tasks take one
    # argument, a list of envelope dicts; a handler run takes (name, envelope).
    if isinstance(body, list) and body and isinstance(body[0], list):
        args = body[0]
        if args and isinstance(args[0], list):
            _quarantine_items(args[0])
        if (
            len(args) == 2
            and isinstance(args[1], dict)
            and exceeds_depth(args[1], ENVELOPE_MAX_DEPTH)
        ):
            args[1] = quarantined(args[1])
    if exceeds_depth(body, WIRE_MAX_DEPTH):
        raise ValueError(f"task message is nested more than {WIRE_MAX_DEPTH} levels deep")
    return body


def loads(data: str | bytes | bytearray | memoryview) -> Any:
    """kombu's JSON decoding, then `guard` on documents that may be too deep.

    The text decoded is what the pre-check reads (`parsed_text_exceeds_depth`):
    a batch of ordinary envelopes passes it without `guard` walking every
    value of every envelope, which cost more than decoding the batch."""
    text = data.tobytes() if isinstance(data, memoryview) else data
    value = _decode(text)
    if parsed_text_exceeds_depth(text, WIRE_MAX_DEPTH):
        return guard(value)
    return value


def _decode(data: str | bytes | bytearray) -> Any:
    """What `kombu_json.loads` gives, without its per-object hook where it cannot act.

    kombu's hook turns objects of exactly the keys `__type__` and `__value__`
    (its encoding of datetimes, UUIDs, bytes...) back into those values, and
    calling it for every object of a batch doubled the time to decode one. A
    text with no `__type__` in it, written out or with an escape (`\\u`),
    has no such object, so the plain decoder gives the same result.
    """
    text = data if isinstance(data, str) else data.decode("utf-8")  # as kombu does
    if "__type__" in text or "\\u" in text:
        return kombu_json.loads(text)
    return json.loads(text)


def install() -> None:
    """Make this process decode JSON task messages with `loads`."""
    serialization.registry.register(
        "json",
        kombu_json.dumps,
        loads,
        content_type="application/json",
        content_encoding="utf-8",
    )
