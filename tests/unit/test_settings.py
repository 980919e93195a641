"""Settings: file, environment and overrides, with errors that name the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hub.errors import ConfigError
from hub.settings import load_settings


def test_defaults_are_the_embedded_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HUB_CONFIG", "HUB_BROKER_URL", "HUB_DATA_DIR", "HUB_MQTT_PORT"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.embedded
    assert settings.mqtt_port == 1883
    assert settings.effective_broker_url.startswith("localqueue:///")
    assert settings.effective_result_backend.startswith("db+sqlite:///")
    assert [(x.port, x.codec) for x in settings.listeners] == [(7700, "native")]


def test_environment_beats_file_and_overrides_beat_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "hub.toml"
    config.write_text("tcp_port = 7000\nmqtt_port = 1999\nhttp_port = 9000\n")
    monkeypatch.setenv("HUB_MQTT_PORT", "2000")
    settings = load_settings(config, http_port=9100)
    assert (settings.tcp_port, settings.mqtt_port, settings.http_port) == (7000, 2000, 9100)


def test_listeners_from_the_file(tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    config.write_text(
        '[[tcp_listeners]]\nport = 7700\ncodec = "native"\n'
        '[[tcp_listeners]]\nport = 7701\ncodec = "lines"\n'
    )
    settings = load_settings(config)
    assert [(x.port, x.codec) for x in settings.listeners] == [(7700, "native"), (7701, "lines")]


@pytest.mark.parametrize(
    ("env", "value", "message"),
    [
        ("HUB_TCP_PORT", "99999", r"'tcp_port' \(HUB_TCP_PORT\) = '99999' is invalid"),
        ("HUB_BROKER_URL", "redis://x", r"'broker_url' \(HUB_BROKER_URL\).*amqp://"),
        ("HUB_MQTT_ALLOW_ANONYMOUS", "perhaps", r"'mqtt_allow_anonymous'"),
    ],
)
def test_a_bad_value_names_key_variable_and_value(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, message: str
) -> None:
    monkeypatch.setenv(env, value)
    with pytest.raises(ConfigError, match=message):
        load_settings()


def test_unknown_keys_and_broken_files_are_clear(tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    config.write_text("tcp_prot = 1\n")
    with pytest.raises(ConfigError, match="unknown setting 'tcp_prot'"):
        load_settings(config)
    config.write_text("tcp_port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(config)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.toml")


def test_the_environment_of_a_child_gives_it_exactly_these_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "hub.toml"
    config.write_text(
        'handlers = ["a.b", "c.d"]\nmqtt_enabled = false\nbatch_window_ms = 0.5\n'
        '[[tcp_listeners]]\nport = 7701\ncodec = "lines"\n'
    )
    settings = load_settings(config, http_port=9100, data_dir=tmp_path / "d")
    for name in [n for n in os.environ if n.startswith("HUB_")]:
        monkeypatch.delenv(name)
    for name, value in settings.to_environment().items():
        monkeypatch.setenv(name, value)
    child = load_settings()
    assert child.model_dump() == {**settings.model_dump(), "data_dir": (tmp_path / "d").resolve()}
    assert child.handlers == ("a.b", "c.d") and child.listeners[0].codec == "lines"
