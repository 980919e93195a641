"""bench.haproxy: the variables it sets are the ones docs/haproxy.cfg reads.

Layer: tests.
"""

from __future__ import annotations

import re

import pytest

from bench.haproxy import HAPROXY_CONFIG, haproxy_env
from bench.services import BenchError


def test_every_variable_of_the_shipped_config_is_set() -> None:
    lines = HAPROXY_CONFIG.read_text("utf-8").splitlines()
    config = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    read = set(re.findall(r"\$\{([A-Z0-9_]+)-", config))
    hubs = [{"tcp": 1001, "mqtt": 1002, "http": 1003}, {"tcp": 2001, "http": 2003}]
    env = haproxy_env(hubs, 7000, 7001)
    assert read and read <= set(env)
    assert env["HUB1_MQTT_PORT"] == "1002" and env["HUB2_HTTP_PORT"] == "2003"
    # A hub without MQTT: its MQTT backend points at its TCP port, never used.
    assert env["HUB2_MQTT_PORT"] == "2001"
    assert env["HAPROXY_TCP_PORT"] == "7000" and env["HAPROXY_BIND"] == "127.0.0.1"


def test_the_config_names_two_hubs_only() -> None:
    with pytest.raises(BenchError, match="2 hubs"):
        haproxy_env([{"tcp": 1, "http": 2}] * 3, 7000, 7001)
