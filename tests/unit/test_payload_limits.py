"""Payload limits where payloads enter (codecs, MQTT payloads) and in the envelope.

A valid JSON object nested hundreds of levels deep, or a pathological number,
must be refused as a bad payload: never accepted (it would break a worker
later) and never any exception but the documented one.
"""

from __future__ import annotations

import json
import struct
import zlib
from datetime import UTC, datetime
from typing import Any

import pytest

from hub.envelope import Envelope, Kind
from hub.errors import EnvelopeError, RemoteProtocolError
from hub.payloads import PayloadTooDeep, exceeds_depth, loads_bounded, parsed_text_exceeds_depth
from hub.protocol.events import Hello, NakReason, Role, Telemetry
from hub.protocol.lines import LinesCodec
from hub.protocol.native import NativeCodec
from hub.topics import DeviceTopic, PayloadLimits
from hub.uplink import envelope_from_payload

HELLO = Hello("dev-1", "secret", 7, 0)


def nested(depth: int, leaf: Any = 1) -> dict[str, Any]:
    """A JSON object nested `depth` levels deep ({"a": 1} is one level), built iteratively."""
    value: Any = leaf
    for _ in range(depth):
        value = {"a": value}
    return value  # type: ignore[no-any-return]


def nested_text(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def native_frame(ftype: int, seq: int, payload: bytes) -> bytes:
    body = struct.pack(">2sBBBII", b"HB", 1, ftype, 0, len(payload), seq) + payload
    return body + struct.pack(">I", zlib.crc32(body))


def native_hub() -> NativeCodec:
    codec = NativeCodec(Role.HUB, max_frame_bytes=1 << 20)
    device = NativeCodec(Role.DEVICE)
    codec.receive_data(device.send(HELLO))
    assert codec.next_event() == HELLO
    return codec


def lines_hub() -> LinesCodec:
    codec = LinesCodec(Role.HUB, max_frame_bytes=1 << 20)
    codec.receive_data(b"HELLO dev-1 secret 7\n")
    assert isinstance(codec.next_event(), Hello)
    return codec


# -- the depth check itself ------------------------------------------------------


def test_depth_is_measured_without_recursion() -> None:
    assert not exceeds_depth({"a": 1}, 1)
    assert exceeds_depth({"a": [1]}, 1)
    assert not exceeds_depth({"a": [1]}, 2)
    assert not exceeds_depth(nested(32), 32)
    assert exceeds_depth(nested(33), 32)
    # Far deeper than the recursion limit: a recursive check would raise here.
    assert exceeds_depth(nested(100_000), 32)


@pytest.mark.parametrize("depth", [500, 975, 5000])
def test_bounded_loads_refuses_deep_documents(depth: int) -> None:
    with pytest.raises(PayloadTooDeep):
        loads_bounded(nested_text(depth).decode(), 32)


# Documents whose strings hold brackets, quotes and backslashes in every
# arrangement the pre-check on parsed text must see through.
TRICKY_DOCUMENTS = [
    {"a": "]]]]}}}}", "b": nested(6)},
    {"a": "[[[[{{{{", "b": nested(6)},
    {"a": 'quote " then ]]]', "b": [[[["x"]]]]},
    {"a": "backslash \\", "b": "]}", "c": nested(7)},
    {"a": 'backslash then quote \\"', "b": '"]]]]"', "c": nested(7)},
    {'\\"]]': ["\\", '\\"', '"[', nested(5)]},
    [{"é\u00e9\ud800": "]" * 50}, [[[[[[[[["deep"]]]]]]]]]],
    {"a": [{"b": [{"c": [{"d": [{"e": [{"f": "}]}]}]"}]}]}]}]}]},
    {"a": "\\" * 5 + '"]]' + "\\" * 4, "b": ['"' * 3, "\\" * 2, nested(9)]},
]


@pytest.mark.parametrize("document", TRICKY_DOCUMENTS)
@pytest.mark.parametrize("max_depth", range(1, 16))
def test_the_pre_check_on_parsed_text_never_misses_a_document_too_deep(
    document: Any, max_depth: int
) -> None:
    for text in (json.dumps(document), json.dumps(document, ensure_ascii=False)):
        assert json.loads(text) == document
        if exceeds_depth(document, max_depth):
            assert parsed_text_exceeds_depth(text, max_depth)
            assert parsed_text_exceeds_depth(text.encode("utf-8", "surrogatepass"), max_depth)
        if not exceeds_depth(document, max_depth // 2):
            # Within a factor of two of the real depth, whatever the strings hold.
            assert not parsed_text_exceeds_depth(text, max_depth)


def test_the_pre_check_on_parsed_text_passes_a_large_shallow_batch() -> None:
    batch = [{"id": str(i), "payload": {"t": 21.5, "note": "[{" * 10}} for i in range(500)]
    text = json.dumps([[batch], {}, {"callbacks": None}])
    assert not parsed_text_exceeds_depth(text, 100)
    assert parsed_text_exceeds_depth(text, 6)  # [args, [batch, {envelope, {payload: 5 levels


# -- TCP codecs ------------------------------------------------------------------


@pytest.mark.parametrize("depth", [33, 500, 975, 5000])
def test_native_codec_refuses_deep_json_with_bad_payload(depth: int) -> None:
    codec = native_hub()
    codec.receive_data(native_frame(0x02, 9, b"\x00" * 8 + nested_text(depth)))
    with pytest.raises(RemoteProtocolError) as info:
        codec.next_event()
    assert info.value.code == NakReason.BAD_PAYLOAD
    assert info.value.seq == 9


def test_native_codec_accepts_json_at_the_depth_limit() -> None:
    codec = native_hub()
    codec.receive_data(native_frame(0x02, 9, b"\x00" * 8 + nested_text(32)))
    event = codec.next_event()
    assert isinstance(event, Telemetry)
    assert not exceeds_depth(event.payload, 32)


def test_native_codec_depth_limit_is_configurable() -> None:
    codec = NativeCodec(Role.HUB, max_payload_depth=2)
    codec.receive_data(NativeCodec(Role.DEVICE).send(HELLO))
    codec.next_event()
    codec.receive_data(native_frame(0x02, 1, b"\x00" * 8 + b'{"a":{"b":1}}'))
    assert isinstance(codec.next_event(), Telemetry)
    codec.receive_data(native_frame(0x02, 2, b"\x00" * 8 + b'{"a":{"b":[1]}}'))
    with pytest.raises(RemoteProtocolError):
        codec.next_event()


def test_brackets_inside_strings_do_not_count() -> None:
    codec = native_hub()
    text = json.dumps({"note": "[" * 500 + "{" * 500}).encode()
    codec.receive_data(native_frame(0x02, 3, b"\x00" * 8 + text))
    assert isinstance(codec.next_event(), Telemetry)


@pytest.mark.parametrize(
    "payload",
    [b'{"a":' + b"1" * 5000 + b"}", b'{"a":1e999}', b'{"a":-Infinity}', b'{"a":NaN}'],
    ids=["int-5000-digits", "1e999", "-Infinity", "NaN"],
)
def test_native_codec_refuses_pathological_numbers(payload: bytes) -> None:
    codec = native_hub()
    codec.receive_data(native_frame(0x02, 4, b"\x00" * 8 + payload))
    with pytest.raises(RemoteProtocolError) as info:
        codec.next_event()
    assert info.value.code == NakReason.BAD_PAYLOAD


@pytest.mark.parametrize("depth", [33, 975, 5000])
def test_lines_codec_refuses_deep_json_with_bad_payload(depth: int) -> None:
    codec = lines_hub()
    codec.receive_data(b"T 5 0 " + nested_text(depth) + b"\n")
    with pytest.raises(RemoteProtocolError) as info:
        codec.next_event()
    assert info.value.code == NakReason.BAD_PAYLOAD
    assert info.value.seq == 5


# -- MQTT payloads ------------------------------------------------------------------


TOPIC = DeviceTopic("dev-1", Kind.TELEMETRY)


@pytest.mark.parametrize(
    "data",
    [
        b'{"t":' + b"9" * 4301 + b"}",
        b'{"values":{"t":' + b"1" * 10_000 + b"}}",
        b'{"t":-' + b"1" * 4301 + b"}",
        b'{"t":1e999}',
        b'{"t":-1e999}',
        b'{"t":NaN}',
        b'{"t":Infinity}',
        b'{"t":-Infinity}',
    ],
    ids=["int-4301", "int-10000-values", "negative-int", "1e999", "-1e999", "nan", "inf", "-inf"],
)
def test_pathological_numbers_are_invalid_payloads(data: bytes) -> None:
    # Before: ValueError (int-conversion limit) escaped as a bridge failure.
    with pytest.raises(EnvelopeError):
        envelope_from_payload(TOPIC, data)


@pytest.mark.parametrize("depth", [33, 500, 975, 5000])
def test_deep_mqtt_payloads_are_invalid(depth: int) -> None:
    with pytest.raises(EnvelopeError, match="nested too deeply"):
        envelope_from_payload(TOPIC, nested_text(depth))


def test_mqtt_payload_limits_are_configurable() -> None:
    limits = PayloadLimits(max_depth=3, max_bytes=100)
    assert envelope_from_payload(TOPIC, b'{"values":{"a":{"b":1}}}', limits=limits).payload
    with pytest.raises(EnvelopeError, match="nested too deeply"):
        envelope_from_payload(TOPIC, b'{"values":{"a":{"b":[1]}}}', limits=limits)
    with pytest.raises(EnvelopeError, match="more than the limit of 100"):
        envelope_from_payload(TOPIC, json.dumps({"a": "x" * 100}).encode(), limits=limits)


# -- the envelope ------------------------------------------------------------------


def envelope_dict(payload: Any) -> dict[str, Any]:
    return {
        "schema": 1,
        "id": "e1",
        "device_id": "dev-1",
        "kind": "telemetry",
        "seq": 1,
        "device_time": None,
        "received_at": datetime.now(UTC).isoformat(),
        "transport": "tcp",
        "protocol": "native",
        "payload": payload,
    }


@pytest.mark.parametrize("depth", [65, 500, 975, 5000])
def test_envelope_refuses_deep_payloads_without_recursing(depth: int) -> None:
    with pytest.raises(PayloadTooDeep):
        Envelope(
            device_id="d", kind=Kind.TELEMETRY, payload=nested(depth), transport="t", protocol="p"
        )
    with pytest.raises(PayloadTooDeep):
        Envelope.from_dict(envelope_dict(nested(depth)))


def test_envelope_takes_the_deepest_allowed_payload_and_it_round_trips() -> None:
    envelope = Envelope.from_dict(envelope_dict(nested(64)))
    assert Envelope.from_json(envelope.to_json()) == envelope


def test_envelope_from_json_refuses_a_document_too_deep_to_parse() -> None:
    text = '{"schema":1,"payload":' + '{"a":' * 5000 + "1" + "}" * 5000 + "}"
    with pytest.raises(EnvelopeError):
        Envelope.from_json(text)


def test_the_depth_setting_cannot_exceed_what_an_envelope_allows() -> None:
    from hub.errors import ConfigError
    from hub.settings import load_settings

    assert load_settings(None, max_payload_depth=64).max_payload_depth == 64
    with pytest.raises(ConfigError, match="max_payload_depth"):
        load_settings(None, max_payload_depth=65)
    with pytest.raises(ConfigError, match="max_payload_bytes"):
        load_settings(None, max_payload_bytes=32 * 1024 * 1024)
