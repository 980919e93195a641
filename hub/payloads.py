"""Limits on device payloads: how deep and how large a JSON value may be.

Layer: core; imports only `hub.errors`. Pure functions, no I/O.

A payload nested hundreds of levels deep is valid JSON, but every recursive
step after the bridge (the envelope check, pickling a batch for a prefork
worker, decoding the task message) may hit Python's recursion limit on it and
take a worker down with every other device's messages in the same batch. So
payloads are bounded where they enter (the codecs, the MQTT payload parser)
and again when an envelope is built or read back (docs/protocol.md, "Limits";
docs/mqtt.md, "Payload limits").

Every check here is iterative: a depth check that recursed would fail on the
very input it exists to refuse.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

from hub.errors import EnvelopeError

#: Default of the `max_payload_depth` setting: far above any real device's
#: payload (a few levels), far below what recursion can cope with.
DEFAULT_MAX_PAYLOAD_DEPTH: Final = 32
#: The most `max_payload_depth` may be set to, and what every envelope is held
#: to whatever the setting: a batch of such envelopes still pickles and decodes
#: (Python's pickler gives up near 480 levels of dicts, its JSON decoder near 1000).
MAX_PAYLOAD_DEPTH_CEILING: Final = 64
#: Default of the `max_payload_bytes` setting (the JSON text of one payload).
DEFAULT_MAX_PAYLOAD_BYTES: Final = 65536
#: The most `max_payload_bytes` may be set to; also the bound on every envelope.
MAX_PAYLOAD_BYTES_CEILING: Final = 16 * 1024 * 1024


class PayloadTooDeep(EnvelopeError):
    """A payload nests deeper than the limit (`reason` "too_deep")."""

    reason = "too_deep"


class PayloadTooLarge(EnvelopeError):
    """A payload is larger than the limit (`reason` "too_large")."""

    reason = "too_large"


def exceeds_depth(value: object, max_depth: int) -> bool:
    """True if `value` nests containers (dicts, lists, tuples) deeper than `max_depth`.

    A scalar has depth 0, `{}` and `{"a": 1}` depth 1, `{"a": [1]}` depth 2.
    Iterative, and it stops as soon as the limit is passed.
    """
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        depth += 1
        if depth > max_depth:
            return True
        stack.extend(
            (child, depth) for child in children if isinstance(child, (Mapping, list, tuple))
        )
    return False


def text_exceeds_depth(text: str | bytes | bytearray, max_depth: int) -> bool:
    """A fast, sound pre-check on JSON text: False when it cannot nest deeper than `max_depth`.

    It counts opening brackets (strings included, so it may say True for a
    shallow document); only then does the caller need to parse and measure.
    """
    if isinstance(text, str):
        return text.count("{") + text.count("[") > max_depth
    return text.count(b"{") + text.count(b"[") > max_depth


#: Every byte but the brackets and the quote (for bytes.translate's delete argument).
_NOT_STRUCTURE: Final = bytes(sorted(set(range(256)) - set(b'[]{}"')))


def parsed_text_exceeds_depth(text: str | bytes | bytearray, max_depth: int) -> bool:
    """A fast, sound pre-check on text that parsed as JSON: False when it cannot
    nest deeper than `max_depth`.

    Much tighter than `text_exceeds_depth`, which counts every opening bracket
    and so says True of any batch of more than a few dozen envelopes. The
    brackets inside strings are dropped first: in valid JSON a quote inside a
    string is escaped, and escapes pair up left to right, so once the escaped
    backslashes and then the escaped quotes are gone every quote left opens or
    closes a string, and what lies between an opening quote and the next is
    dropped. Then pairs of brackets are taken off from the inside,
    round by round. A round takes off at most one level of each kind, so the
    bound checked is at most twice the real depth: True may still be said of a
    document up to half as deep as the limit, never False of one too deep.
    Only for text known to be valid JSON (what comes out of a JSON decoder).
    """
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if b"\\\\" in data:
        data = data.replace(b"\\\\", b"")
    if b'\\"' in data:
        data = data.replace(b'\\"', b"")
    # Quotes with no bracket between them go first (most strings, and the gaps
    # between them); what is left between the quotes still there is in strings.
    brackets = data.translate(None, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in brackets:
        brackets = b"".join(brackets.split(b'"')[::2])
    levels = 0
    while brackets:
        levels += 2
        if levels > max_depth:
            return True
        brackets = brackets.replace(b"[]", b"").replace(b"{}", b"")
    return False


def check_depth(value: object, max_depth: int, what: str = "payload") -> None:
    """PayloadTooDeep if `value` nests deeper than `max_depth`."""
    if exceeds_depth(value, max_depth):
        raise PayloadTooDeep(
            f"{what} is nested too deeply (more than {max_depth} levels)", field="payload"
        )


def check_size(size: int, max_bytes: int, what: str = "payload") -> None:
    """PayloadTooLarge if `size` bytes exceed `max_bytes`."""
    if size > max_bytes:
        raise PayloadTooLarge(
            f"{what} is {size} bytes, more than the limit of {max_bytes}", field="payload"
        )


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity, which are not JSON (RFC 8259).
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # 1e999 parses to inf: not a number JSON can carry back out.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of the range of a double")
    return value


_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def loads_bounded(text: str, max_depth: int) -> Any:
    """Parse strict JSON no deeper than `max_depth`.

    Raises ValueError for anything that is not strict JSON: syntax errors,
    NaN and Infinity, floats out of range, integers longer than Python's
    int-conversion limit (4,300 digits); and PayloadTooDeep (also for a
    document so deep that the parser itself runs out of recursion).
    """
    try:
        value = _DECODER.decode(text)
    except RecursionError:
        raise PayloadTooDeep(
            f"payload is nested too deeply (more than {max_depth} levels)", field="payload"
        ) from None
    if text_exceeds_depth(text, max_depth):
        check_depth(value, max_depth)
    return value
