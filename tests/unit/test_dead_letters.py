"""The dead-letter table and its functions, worker counters, and the worker's
bounded task-body decoder (all pure code over a real SQLite database)."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kombu.utils import json as kombu_json
from sqlalchemy import Engine

from hub import dead_letters, worker_metrics
from hub.dead_letters import DeadLetterError, NewDeadLetter
from hub.storage import make_engine, migrate
from tasks import wire


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    url = f"sqlite:///{tmp_path / 'hub.sqlite3'}"
    migrate(url)
    return make_engine(url)


ENVELOPE = {"id": "e-1", "device_id": "dev-1", "kind": "telemetry", "payload": {"t": 1}}


def letter(**overrides: Any) -> NewDeadLetter:
    values: dict[str, Any] = {
        "source": "tasks.ingest.telemetry",
        "reason": dead_letters.INVALID_ENVELOPE,
        "error": "seq must be an integer or null",
        "envelope": ENVELOPE,
        "task_name": "tasks.ingest.telemetry",
        "task_args": [[ENVELOPE]],
    }
    values.update(overrides)
    return NewDeadLetter(**values)


def test_record_list_show(engine: Engine) -> None:
    first = dead_letters.record(engine, letter())
    second = dead_letters.record(engine, letter(raw="{not json", envelope=None, task_name=None))
    rows = dead_letters.list_dead_letters(engine)
    assert [r["id"] for r in rows] == [second, first]
    assert "payload" not in rows[0]
    shown = dead_letters.get_dead_letter(engine, first)
    assert shown["status"] == "dead"
    assert shown["device_id"] == "dev-1"
    assert shown["envelope_id"] == "e-1"
    assert json.loads(shown["payload"]) == ENVELOPE
    assert shown["replayable"] is True
    raw = dead_letters.get_dead_letter(engine, second)
    assert raw["payload"] == "{not json"
    assert raw["replayable"] is False
    assert dead_letters.count_dead_letters(engine) == {"dead": 2, "replayed": 0, "discarded": 0}


def test_unknown_letter_is_a_clear_error(engine: Engine) -> None:
    with pytest.raises(DeadLetterError, match="no dead letter"):
        dead_letters.get_dead_letter(engine, "nope")
    with pytest.raises(DeadLetterError, match="no dead letter"):
        dead_letters.mark_discarded(engine, "nope")


def test_replay_is_claimed_once_and_released_on_failure(engine: Engine) -> None:
    letter_id = dead_letters.record(engine, letter())
    claim = dead_letters.claim_replay(engine, letter_id)
    assert (claim.task_name, claim.args) == ("tasks.ingest.telemetry", [[ENVELOPE]])
    with pytest.raises(DeadLetterError, match="is replayed, not dead"):
        dead_letters.claim_replay(engine, letter_id)
    dead_letters.release_replay(engine, letter_id)
    assert dead_letters.get_dead_letter(engine, letter_id)["status"] == "dead"
    dead_letters.mark_replayed(engine, letter_id)
    assert dead_letters.list_dead_letters(engine) == []
    assert len(dead_letters.list_dead_letters(engine, status="replayed")) == 1


def test_discard_and_a_letter_with_nothing_to_replay(engine: Engine) -> None:
    letter_id = dead_letters.record(engine, letter(task_name=None, task_args=None))
    with pytest.raises(DeadLetterError, match="no task to replay"):
        dead_letters.claim_replay(engine, letter_id)
    dead_letters.mark_discarded(engine, letter_id)
    with pytest.raises(DeadLetterError, match="is discarded"):
        dead_letters.mark_discarded(engine, letter_id)
    assert len(dead_letters.list_dead_letters(engine, status=None)) == 1


def test_a_payload_too_deep_for_json_is_still_recorded(engine: Engine) -> None:
    deep: Any = 1
    for _ in range(100_000):
        deep = {"a": deep}
    letter_id = dead_letters.record(engine, letter(envelope={"id": "e-2", "payload": deep}))
    assert dead_letters.get_dead_letter(engine, letter_id)["envelope_id"] == "e-2"


def test_worker_counters_sum_over_workers(engine: Engine) -> None:
    worker_metrics.add(engine, "celery@a", {worker_metrics.ROWS_STORED: 5})
    worker_metrics.add(engine, "celery@a", {worker_metrics.ROWS_STORED: 2})
    worker_metrics.add(engine, "celery@b", {worker_metrics.ROWS_STORED: 1, "dead_letters": 1})
    totals = worker_metrics.totals(engine)
    assert totals[worker_metrics.ROWS_STORED] == 8
    assert totals[worker_metrics.DEAD_LETTERS] == 1
    assert totals[worker_metrics.WORKER_STARTS] == 0


# -- the worker's decoder ---------------------------------------------------------


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def test_shallow_bodies_decode_unchanged() -> None:
    body = [[[ENVELOPE]], {}, {"callbacks": None}]
    assert wire.loads(json.dumps(body)) == body


@pytest.mark.parametrize(
    "text",
    [
        kombu_json.dumps([[[ENVELOPE]], {"at": datetime(2026, 1, 2, tzinfo=UTC)}, {}]),
        kombu_json.dumps([["x", {"id": uuid.UUID(int=7), "raw": b"\xff"}], {}, {}]),
        # The same markers with an escape in the key: still kombu's values.
        '[[{"\\u005f_type__": "datetime", "__value__": "2026-01-02T00:00:00+00:00"}], {}, {}]',
        json.dumps([[[dict(ENVELOPE, payload={"t": "é", "__type__": 1})]], {}, {}]),
        json.dumps([[[ENVELOPE]], {}, {"callbacks": None}]).encode(),
    ],
)
def test_bodies_decode_as_kombu_decodes_them(text: str | bytes) -> None:
    assert wire.loads(text) == kombu_json.loads(text)
    assert wire.loads(memoryview(text.encode() if isinstance(text, str) else text)) == (
        kombu_json.loads(text)
    )


def test_a_too_deep_envelope_in_a_batch_is_quarantined_and_the_rest_kept() -> None:
    deep = dict(ENVELOPE, id="e-deep", payload=nested(900))
    body = [[[ENVELOPE, deep]], {}, {}]
    decoded = wire.loads(json.dumps(body))
    good, bad = decoded[0][0]
    assert good == ENVELOPE
    assert bad[wire.QUARANTINE_KEY] == "too_deep"
    assert bad["id"] == "e-deep"
    # What the prefork pool pickles is now shallow.
    import pickle

    pickle.dumps(decoded)


def test_a_too_deep_body_of_another_shape_is_a_decode_error() -> None:
    with pytest.raises(ValueError, match="nested more than"):
        wire.loads(json.dumps({"x": nested(300)}))
