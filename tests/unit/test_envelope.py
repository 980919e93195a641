"""The envelope: JSON round trip, validation, stable ids."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.envelope import Envelope, Kind, envelope_id
from hub.errors import EnvelopeError

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


def make(**overrides: object) -> Envelope:
    values: dict[str, object] = {
        "device_id": "thermo-1",
        "kind": Kind.TELEMETRY,
        "payload": {"t": 21.5},
        "transport": "tcp",
        "protocol": "native",
        "seq": 7,
    }
    values.update(overrides)
    return Envelope(**values)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    payload=st.dictionaries(st.text(max_size=10), json_values, max_size=6),
    kind=st.sampled_from(list(Kind)),
    seq=st.none() | st.integers(min_value=0, max_value=2**32),
)
def test_json_round_trip(payload: dict[str, object], kind: Kind, seq: int | None) -> None:
    env = make(payload=payload, kind=kind, seq=seq, device_time=datetime(2026, 1, 2, tzinfo=UTC))
    assert Envelope.from_json(env.to_json()) == env


def test_the_id_is_stable_for_a_retransmission_and_changes_with_boot() -> None:
    assert make().id == make().id == envelope_id("thermo-1", 7)
    assert envelope_id("thermo-1", 7, boot_id=1) != envelope_id("thermo-1", 7, boot_id=2)
    assert make(seq=None).id != make(seq=None).id


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"device_id": ""}, "device_id"),
        ({"device_id": "a/b"}, "device_id"),
        ({"device_id": "x" * 129}, "device_id"),
        ({"kind": "weather"}, "kind"),
        ({"payload": [1, 2]}, "payload"),
        ({"payload": {"t": float("nan")}}, "payload"),
        ({"payload": {"t": object()}}, "payload"),
        ({"seq": -1}, "seq"),
    ],
)
def test_invalid_envelopes_are_refused(change: dict[str, object], field: str) -> None:
    with pytest.raises(EnvelopeError) as info:
        make(**change)
    assert info.value.field == field


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(schema=99),
        lambda d: d.update(received_at="yesterday"),
        lambda d: d.update(received_at="2026-01-01T00:00:00"),  # no time zone
        lambda d: d.pop("id"),
        lambda d: d.update(seq="7"),
    ],
)
def test_reading_back_validates(mutate: object) -> None:
    data = make().to_dict()
    mutate(data)  # type: ignore[operator]
    with pytest.raises(EnvelopeError):
        Envelope.from_dict(data)


def test_garbage_json_is_an_envelope_error() -> None:
    with pytest.raises(EnvelopeError):
        Envelope.from_json("{not json")
    with pytest.raises(EnvelopeError):
        Envelope.from_json(json.dumps([1, 2]))
