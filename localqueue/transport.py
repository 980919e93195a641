"""A kombu virtual transport over `localqueue.store`: real acknowledgement on SQLite.

Layer: localqueue; imports kombu and `localqueue.store`, no other project package.

kombu's own SQLAlchemy transport hides a message when it hands it out and
never gives it back, nor deletes it: `acks_late` cannot work on it, and its
table only grows. Here a message handed out is a lease (see the store): the
delivery tag is the row id, `ack` deletes the row, a reject with requeue or
a warm shutdown releases it, and a consumer that dies returns what it held.
What a task publishes into the queue (handler runs, retries) is committed
with the task's own acknowledgement, so a killed task has sent nothing twice.

URL: `localqueue:///<absolute path of the queue file>`.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from queue import Empty
from typing import Any
from urllib.parse import urlparse

from kombu.transport import virtual

from localqueue.store import Store, open_store

SCHEME = "localqueue"


def url_for(path: Path) -> str:
    """The broker URL of the queue file at `path`."""
    return f"{SCHEME}://{path.resolve()}"


def path_of(url: str) -> Path:
    parsed = urlparse(url)
    if parsed.scheme != SCHEME or not parsed.path:
        raise ValueError(f"not a local queue URL: {url!r}")
    return Path(parsed.path)


class QoS(virtual.QoS):  # type: ignore[misc]
    """Acknowledgement deletes the row; a reject without requeue does too."""

    channel: Channel

    def ack(self, delivery_tag: Any) -> None:
        self.channel.store.ack(int(delivery_tag))
        super().ack(delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        if requeue:
            self.channel.store.release(int(delivery_tag))
        else:
            # kombu drops a message rejected without requeue (no dead-letter
            # exchange on virtual transports); so do we.
            self.channel.store.ack(int(delivery_tag))
        self._quick_ack(delivery_tag)


class Channel(virtual.Channel):  # type: ignore[misc]
    QoS = QoS
    do_restore = True

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        self.store: Store = open_store(path_of(connection.client.hostname))

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        """Queues exist by name; nothing to create."""

    def _put(self, queue: str, message: dict[str, Any], **kwargs: Any) -> None:
        self.store.put(queue, json.dumps(message))

    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        claimed = self.store.claim(queue)
        if claimed is None:
            raise Empty()
        payload: dict[str, Any] = json.loads(claimed.payload)
        properties = payload["properties"]
        # The row id is the delivery tag: ack and release find the row by it.
        properties["delivery_tag"] = claimed.id
        if claimed.deliveries > 1:
            properties.setdefault("delivery_info", {})["redelivered"] = True
            payload["redelivered"] = True
        return payload

    def _get_and_deliver(self, queue: str, callback: Any) -> None:
        message = self._get(queue)
        # The task runs inside this callback (solo pool): what it publishes is
        # committed with its acknowledgement (see the store's `deliver`).
        with self.store.deliver(message["properties"]["delivery_tag"]):
            callback(message, queue)

    def _restore(self, message: Any) -> None:
        """Give an unacknowledged message back (warm shutdown, recover)."""
        self.store.release(int(message.delivery_tag))

    def _restore_at_beginning(self, message: Any) -> None:
        self._restore(message)

    def _size(self, queue: str) -> int:
        return self.store.size(queue)

    def _purge(self, queue: str) -> int:
        return self.store.purge(queue)

    def _delete(self, queue: str, *args: Any, **kwargs: Any) -> None:
        self.store.delete_queue(queue)


class Transport(virtual.Transport):  # type: ignore[misc]
    Channel = Channel
    #: The URL names a file; kombu must not parse it as host and port.
    can_parse_url = True
    default_port = 0
    #: The worker polls the queue this often when it is empty (a cheap read).
    polling_interval = 0.1
    driver_type = "sqlite"
    driver_name = "localqueue"
    connection_errors = (*virtual.Transport.connection_errors, sqlite3.OperationalError)
    channel_errors = (*virtual.Transport.channel_errors, sqlite3.DatabaseError)

    def driver_version(self) -> str:
        return sqlite3.sqlite_version
