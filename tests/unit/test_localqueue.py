"""The local queue: leases, acknowledgement, dead consumers, kombu round trips.

Real SQLite files and real processes (a consumer that dies is a killed child).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from kombu import Connection

import localqueue
from localqueue.store import Store, open_store, owner_gone, owner_token


def test_a_claimed_message_is_hidden_until_acked_then_gone(tmp_path: Path) -> None:
    store = Store(tmp_path / "q.sqlite3")
    store.put("a", "one")
    store.put("a", "two")
    claimed = store.claim("a")
    assert claimed is not None and claimed.payload == "one"
    assert store.size("a") == 1 and store.total() == 2
    store.ack(claimed.id)
    nxt = store.claim("a")
    assert nxt is not None and nxt.payload == "two"
    assert store.claim("a") is None
    store.ack(nxt.id)
    assert store.total() == 0


def test_release_gives_a_message_back_first_in_line(tmp_path: Path) -> None:
    store = Store(tmp_path / "q.sqlite3")
    store.put("a", "one")
    store.put("a", "two")
    claimed = store.claim("a")
    assert claimed is not None
    store.release(claimed.id)
    again = store.claim("a")
    assert again is not None and again.payload == "one" and again.deliveries == 2


def test_an_unrenewed_lease_ends(tmp_path: Path) -> None:
    store = Store(tmp_path / "q.sqlite3", lease_s=0.3)
    store.put("a", "one")
    assert store.claim("a") is not None
    assert store.claim("a") is None
    time.sleep(0.5)
    again = store.claim("a")
    assert again is not None and again.deliveries == 2


def test_a_living_process_keeps_its_lease(tmp_path: Path) -> None:
    store = Store(tmp_path / "q.sqlite3", lease_s=0.3)
    store.put("a", "one")
    assert store.claim("a") is not None
    for _ in range(4):
        time.sleep(0.2)
        store.renew()  # what the renewer thread does every third of a lease
        assert store.claim("a") is None


def _claim_then_die(path: str, queue: str) -> None:
    store = Store(Path(path))
    assert store.claim(queue) is not None
    os.kill(os.getpid(), signal.SIGKILL)


def test_what_a_killed_consumer_held_comes_back_at_once(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    store = Store(path)  # a long lease: only the reaper can give it back
    store.put("a", "held")
    child = multiprocessing.get_context("spawn").Process(
        target=_claim_then_die, args=(str(path), "a")
    )
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    with sqlite3.connect(path) as db:
        (owner,) = db.execute("SELECT owner FROM queue_messages").fetchone()
    assert owner.split("/")[1] == str(child.pid)
    again = store.claim("a")  # the claim looks for gone owners first
    assert again is not None and again.payload == "held" and again.deliveries == 2


def test_the_reaper_returns_only_what_gone_processes_held(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    store = Store(path)
    store.put("a", "mine")
    store.put("a", "theirs")
    mine = store.claim("a")
    assert mine is not None
    with sqlite3.connect(path) as db:
        # pid 1 runs, but not since 1970: the owner is gone.
        db.execute(
            "UPDATE queue_messages SET owner = ?, visible_at = 1e12 WHERE id > ?",
            (f"{socket.gethostname()}/1/0.00", mine.id),
        )
    assert store.reap() == 1
    assert store.size("a") == 1


def test_owner_tokens_tell_living_from_gone() -> None:
    assert not owner_gone(owner_token())
    host, pid, started = owner_token().rsplit("/", 2)
    assert owner_gone(f"{host}/{pid}/{float(started) - 100:.2f}")  # pid reused
    assert not owner_gone(f"another-host/{pid}/1.00")  # not ours to judge
    assert owner_gone("garbage")


def _handle_publish_then_die(path: str) -> None:
    store = Store(Path(path))
    claimed = store.claim("in")
    assert claimed is not None
    with store.deliver(claimed.id):
        store.put("out", "sent by the task")
        os.kill(os.getpid(), signal.SIGKILL)


def test_what_a_killed_task_published_was_never_sent(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    store = Store(path)
    store.put("in", "task")
    child = multiprocessing.get_context("spawn").Process(
        target=_handle_publish_then_die, args=(str(path),)
    )
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    assert store.size("out") == 0
    again = store.claim("in")
    assert again is not None and again.deliveries == 2


def test_what_a_task_publishes_is_committed_with_its_ack(tmp_path: Path) -> None:
    store = Store(tmp_path / "q.sqlite3")
    store.put("in", "one")
    store.put("in", "two")
    first = store.claim("in")
    assert first is not None
    with store.deliver(first.id):
        store.put("out", "a")
        store.put("out", "b")
        assert store.size("out") == 0  # held until the ack
        store.ack(first.id)
        assert store.size("out") == 2
        store.put("out", "after the ack")  # no longer held
        assert store.size("out") == 3
    second = store.claim("in")
    assert second is not None
    with store.deliver(second.id):
        store.put("out", "not acked in the handling")
    assert store.size("out") == 4  # committed when the handling ended
    assert store.total() == 5


def _consume_all(path: str, queue: str, out: str) -> None:
    store = Store(Path(path))
    seen = []
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < 2.0:
        claimed = store.claim(queue)
        if claimed is None:
            time.sleep(0.01)
            continue
        idle_since = time.monotonic()
        seen.append(claimed.payload)
        store.ack(claimed.id)
    Path(out).write_text(json.dumps(seen))


def test_two_consumers_and_a_publisher_each_message_once(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    publisher = Store(path)
    ctx = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    consumers = [ctx.Process(target=_consume_all, args=(str(path), "a", str(o))) for o in outs]
    for c in consumers:
        c.start()
    for n in range(300):
        publisher.put("a", str(n))
    for c in consumers:
        c.join(120)
        assert c.exitcode == 0
    seen = [m for o in outs for m in json.loads(o.read_text())]
    assert sorted(seen, key=int) == [str(n) for n in range(300)]
    assert publisher.total() == 0


def test_kombu_round_trip_acks_delete_and_closing_returns(tmp_path: Path) -> None:
    url = localqueue.url_for(tmp_path / "q.sqlite3")
    with Connection(url) as conn:
        queue = conn.SimpleQueue("jobs")
        queue.put({"n": 1})
        queue.put({"n": 2})
        message = queue.get(timeout=5)
        assert message.payload == {"n": 1}
        message.ack()
        unacked = queue.get(timeout=5)
        assert unacked.payload == {"n": 2}
        queue.close()  # a warm shutdown: the unacknowledged message goes back
    with Connection(url) as conn:
        queue = conn.SimpleQueue("jobs")
        again = queue.get(timeout=5)
        assert again.payload == {"n": 2} and again.delivery_info.get("redelivered")
        again.ack()
        queue.close()
    assert open_store(localqueue.path_of(url)).total() == 0


def test_a_reject_without_requeue_deletes_and_with_requeue_returns(tmp_path: Path) -> None:
    url = localqueue.url_for(tmp_path / "q.sqlite3")
    with Connection(url) as conn:
        queue = conn.SimpleQueue("jobs")
        queue.put({"n": 1})
        queue.get(timeout=5).reject(requeue=True)
        queue.get(timeout=5).reject()
        with pytest.raises(queue.Empty):
            queue.get(timeout=0.3)
        queue.close()
    assert open_store(localqueue.path_of(url)).total() == 0


def test_messages_left_by_kombus_sqlalchemy_transport_are_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "queue.sqlite3"
    with Connection(f"sqla+sqlite:///{path}") as conn:
        old = conn.SimpleQueue("jobs")
        old.put({"n": 1})
        old.put({"n": 2})
        old.get(timeout=5).ack()  # handed out: that transport keeps it, hidden
        old.close()
    with Connection(localqueue.url_for(path)) as conn:
        queue = conn.SimpleQueue("jobs")
        message = queue.get(timeout=5)
        assert message.payload == {"n": 2}
        message.ack()
        queue.close()
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "kombu_message" not in tables


def test_the_embedded_broker_url_is_a_local_queue_url(tmp_path: Path) -> None:
    from hub.settings import load_settings

    url = load_settings(data_dir=tmp_path).effective_broker_url
    assert localqueue.path_of(url) == (tmp_path / "queue.sqlite3").resolve()
    assert sys.modules["localqueue.transport"]
