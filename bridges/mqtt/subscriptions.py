"""The subscription index: which subscribed filters can match a topic, without trying them all.

Layer: bridges; imports nothing of the project and no I/O library (pure: no
amqtt, no asyncio), so it is unit-tested on its own (tests/unit).

Stock amqtt tests every published topic against every subscription filter.
With thousands of devices each subscribed to its own command topic that is
linear in the fleet for every telemetry message (docs/mqtt.md, "Subscription
matching"). Here filters are indexed by their literal prefix (the levels
before the first wildcard; a wildcard-free filter is its own prefix, found by
a dict lookup of the topic) and that prefix's depth, and only the topic's
prefix at each depth in use is looked up: linear in the topic's length,
whatever its depth, and in the number of distinct depths.

The index holds filters only; who holds each filter, at which QoS, is the
broker's table (`SubscriptionTable`). A filter the table no longer has is
pruned from the index lazily, when a lookup meets it.
"""

from __future__ import annotations

from collections.abc import Container, Iterator
from typing import TypeVar

_V = TypeVar("_V")


class SubscriptionTable(dict[str, _V]):
    """The broker's `topic filter -> holders` table. amqtt loops over it with
    `for topic in ...` around awaits (a reconnect publishing retained messages)
    while other clients may subscribe; iterating a snapshot keeps that from
    failing with "dictionary changed size during iteration"."""

    def __iter__(self) -> Iterator[str]:
        return iter(list(dict.keys(self)))

    def __repr__(self) -> str:
        # amqtt logs repr(subscriptions) after every SUBSCRIBE (at DEBUG, but the
        # argument is built anyway): the full repr made connects O(n^2).
        return f"<subscriptions: {len(self)} filters>"


def literal_prefix(topic_filter: str) -> tuple[int, str]:
    """The levels of a filter before its first wildcard: how many, and joined again."""
    levels = topic_filter.split("/")
    for depth, level in enumerate(levels):
        if level in ("+", "#"):
            return depth, "/".join(levels[:depth])
    return len(levels), topic_filter


def topic_matches(topic: str, topic_filter: str) -> bool:
    """Whether a topic name matches a filter (MQTT 3.1.1 section 4.7)."""
    if topic.startswith("$") and topic_filter.startswith(("+", "#")):
        return False  # [MQTT-4.7.2-1]
    if "#" not in topic_filter and "+" not in topic_filter:
        return topic_filter == topic
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for at, level in enumerate(filter_levels):
        if ("+" in level and level != "+") or ("#" in level and level != "#"):
            return False
        if level == "#":
            return at == len(filter_levels) - 1  # [MQTT-4.7.1-2]
        if at >= len(topic_levels) or level not in ("+", topic_levels[at]):
            return False
    return len(filter_levels) == len(topic_levels)


class SubscriptionIndex:
    """Subscribed filters by the depth of their literal prefix, then by that prefix."""

    def __init__(self) -> None:
        self._by_depth: dict[int, dict[str, dict[str, None]]] = {}

    def add(self, topic_filter: str) -> None:
        """Index a filter (again: no effect)."""
        depth, prefix = literal_prefix(topic_filter)
        self._by_depth.setdefault(depth, {}).setdefault(prefix, {})[topic_filter] = None

    def __len__(self) -> int:
        return sum(
            len(bucket) for by_prefix in self._by_depth.values() for bucket in by_prefix.values()
        )

    def matching(self, topic: str, subscribed: Container[str]) -> list[str]:
        """The filters that match `topic`, of those still in `subscribed`.

        A filter can only match topics that begin with its literal prefix, so
        only one bucket per prefix depth that some filter has is looked at:
        the topic's own prefix of that many levels. The cost follows the
        topic's length times the number of distinct depths (bounded by
        `mqtt_max_topic_levels`), not the number of subscriptions, and never
        the square of the topic's depth (every prefix of a 32,767-level topic
        built one by one took seconds).
        """
        found: list[str] = []
        index = self._by_depth
        if not index:
            return found
        # Where each of the topic's first levels ends, up to the deepest prefix.
        ends: list[int] = []
        at = -1
        for _ in range(max(index)):
            at = topic.find("/", at + 1)
            if at < 0:
                ends.append(len(topic))  # the last level
                break
            ends.append(at)
        for depth in list(index):
            if depth > len(ends):
                continue  # the topic has fewer levels than this prefix
            by_prefix = index[depth]
            prefix = topic[: ends[depth - 1]] if depth else ""
            bucket = by_prefix.get(prefix)
            if bucket is None:
                continue
            for topic_filter in list(bucket):
                if topic_filter not in subscribed:
                    del bucket[topic_filter]
                elif topic_matches(topic, topic_filter):
                    found.append(topic_filter)
            if not bucket:
                del by_prefix[prefix]
                if not by_prefix:
                    del index[depth]
        return found
