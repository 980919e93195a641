"""Unit tests for the subscription index (bridges/mqtt/subscriptions.py): pure, no broker."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridges.mqtt.subscriptions import (
    SubscriptionIndex,
    SubscriptionTable,
    literal_prefix,
    topic_matches,
)


@pytest.mark.parametrize(
    ("topic_filter", "prefix"),
    [
        ("devices/dev-1/commands", (3, "devices/dev-1/commands")),
        ("devices/+/commands", (1, "devices")),
        ("devices/dev-1/commands/#", (3, "devices/dev-1/commands")),
        ("#", (0, "")),
        ("+/+", (0, "")),
        ("/+/#", (1, "")),
        ("/", (2, "/")),
    ],
)
def test_the_literal_prefix_is_the_levels_before_the_first_wildcard(
    topic_filter: str, prefix: tuple[int, str]
) -> None:
    assert literal_prefix(topic_filter) == prefix


@pytest.mark.parametrize(
    ("topic", "topic_filter", "matches"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/b", "a/+", True),
        ("a/b/c", "a/+", False),
        ("a/b/c", "a/#", True),
        ("a", "a/#", True),  # [MQTT-4.7.1-2]: "#" also matches the parent level
        ("a/b", "+/+", True),
        ("/a", "+/+", True),
        ("a", "+/+", False),
        ("a/b", "#", True),
        ("$SYS/x", "#", False),  # [MQTT-4.7.2-1]
        ("$SYS/x", "+/x", False),
        ("$SYS/x", "$SYS/#", True),
        ("a/b", "a/#/b", False),  # "#" must be last
        ("a/b", "a/b+", False),  # a wildcard must fill its level
    ],
)
def test_topic_matching_follows_mqtt(topic: str, topic_filter: str, matches: bool) -> None:
    assert topic_matches(topic, topic_filter) is matches


def test_the_index_finds_exactly_the_matching_filters() -> None:
    index = SubscriptionIndex()
    filters = ["#", "+/+", "/+/#", "devices/+/commands", "devices/d1/commands", "a/b", "/"]
    for topic_filter in filters:
        index.add(topic_filter)
    subscribed = set(filters)
    assert sorted(index.matching("devices/d1/commands", subscribed)) == [
        "#",
        "devices/+/commands",
        "devices/d1/commands",
    ]
    assert sorted(index.matching("/", subscribed)) == ["#", "+/+", "/", "/+/#"]
    assert index.matching("$SYS/x", subscribed) == []


def test_a_filter_no_longer_subscribed_is_pruned_when_met() -> None:
    index = SubscriptionIndex()
    index.add("a/b")
    index.add("a/+")
    assert len(index) == 2
    assert index.matching("a/b", {"a/+"}) == ["a/+"]
    assert len(index) == 1
    assert index.matching("a/b", set()) == []
    assert len(index) == 0


def test_adding_a_filter_twice_indexes_it_once() -> None:
    index = SubscriptionIndex()
    index.add("a/+")
    index.add("a/+")
    assert index.matching("a/b", {"a/+"}) == ["a/+"]


def test_a_deep_topic_is_matched_without_building_every_prefix() -> None:
    index = SubscriptionIndex()
    for topic_filter in ("#", "/+/#", "a/b"):
        index.add(topic_filter)
    deep = "/" * 65534  # 65,535 empty levels
    assert sorted(index.matching(deep, {"#", "/+/#", "a/b"})) == ["#", "/+/#"]


levels = st.sampled_from(["a", "b", "", "$x"])
filter_levels = st.sampled_from(["a", "b", "", "+"])


@st.composite
def topic_filters(draw: st.DrawFn) -> str:
    parts = draw(st.lists(filter_levels, min_size=1, max_size=4))
    if draw(st.booleans()):
        parts.append("#")
    return "/".join(parts)


@given(
    filters=st.lists(topic_filters(), max_size=12),
    topic=st.lists(levels, min_size=1, max_size=5).map("/".join),
)
def test_the_index_agrees_with_trying_every_filter(filters: list[str], topic: str) -> None:
    index = SubscriptionIndex()
    for topic_filter in filters:
        index.add(topic_filter)
    subscribed = set(filters)
    expected = sorted(f for f in subscribed if topic_matches(topic, f))
    assert sorted(index.matching(topic, subscribed)) == expected


def test_the_table_iterates_a_snapshot_and_has_a_short_repr() -> None:
    table: SubscriptionTable[list[int]] = SubscriptionTable(a=[1], b=[2])
    for key in table:
        table[key + "x"] = []  # no "dictionary changed size during iteration"
    assert repr(table) == "<subscriptions: 4 filters>"
