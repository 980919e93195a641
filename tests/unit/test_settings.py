"""Settings: file, environment and overrides, with errors that name the key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hub.errors import ConfigError
from hub.settings import load_settings, redact_url


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


# -- one line that names the fix (issue: postgres:// tracebacks, silent typos) --


@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
def test_a_postgres_url_gets_the_installed_driver(
    monkeypatch: pytest.MonkeyPatch, scheme: str
) -> None:
    monkeypatch.setenv("HUB_DATABASE_URL", f"{scheme}://hub:pw@db.example:5432/hub")
    settings = load_settings()
    assert settings.effective_database_url == "postgresql+psycopg://hub:pw@db.example:5432/hub"
    assert settings.effective_result_backend == f"db+{settings.effective_database_url}"


def test_an_explicit_driver_and_sqlite_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUB_DATABASE_URL", "postgresql+psycopg2://h/db")
    assert load_settings().database_url == "postgresql+psycopg2://h/db"
    monkeypatch.setenv("HUB_DATABASE_URL", "sqlite:////tmp/x.sqlite3")
    assert load_settings().database_url == "sqlite:////tmp/x.sqlite3"


def test_postgres_without_a_driver_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith("psycopg") else real(name, *a),
    )
    monkeypatch.setenv("HUB_DATABASE_URL", "postgres://h/db")
    with pytest.raises(ConfigError, match=r"pip install 'mqtt-hardware-hub\[postgres\]'") as err:
        load_settings()
    assert (err.value.key, err.value.env) == ("database_url", "HUB_DATABASE_URL")


@pytest.mark.parametrize("url", ["mysql://h/db", "hub.sqlite3"])
def test_an_unsupported_database_is_one_line(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("HUB_DATABASE_URL", url)
    with pytest.raises(ConfigError, match="HUB_DATABASE_URL") as err:
        load_settings()
    assert "\n" not in str(err.value)


def test_a_misspelled_variable_suggests_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUB_TCP_PROT", "7000")
    with pytest.raises(ConfigError, match=r"HUB_TCP_PROT; did you mean HUB_TCP_PORT\?") as err:
        load_settings()
    assert err.value.env == "HUB_TCP_PROT"


def test_an_unknown_variable_without_a_near_name_says_unset_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HUB_XYZZY", "1")
    with pytest.raises(ConfigError, match="unknown environment variable HUB_XYZZY; unset it"):
        load_settings()
    monkeypatch.delenv("HUB_XYZZY")
    monkeypatch.setenv("HUB_TEST_ANYTHING", "1")  # reserved for the test suite
    load_settings()


def test_an_unknown_key_suggests_the_nearest(tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    config.write_text('mqtt_prot = 1884\n[[tcp_listeners]]\nport = 7701\ncodex = "lines"\n')
    with pytest.raises(ConfigError) as err:
        load_settings(config)
    message = str(err.value)
    assert "unknown setting 'mqtt_prot'" in message and "did you mean 'mqtt_port'?" in message
    assert "'tcp_listeners.0.codex'" in message and "did you mean 'codec'?" in message
    assert str(config) in message and "\n" not in message


def test_keys_beside_a_hub_table_are_not_ignored(tmp_path: Path) -> None:
    config = tmp_path / "hub.toml"
    config.write_text("tcp_port = 7000\n[hub]\nmqtt_port = 1884\n")
    with pytest.raises(ConfigError, match=r"\[hub\] table and also tcp_port outside it"):
        load_settings(config)


def test_a_password_in_a_bad_url_is_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUB_BROKER_URL", "redis://user:s3cret@host:6379/0")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "s3cret" not in str(err.value) and "HUB_BROKER_URL" in str(err.value)


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


def test_broker_url_lists_the_nodes_of_a_cluster() -> None:
    settings = load_settings(broker_url="amqp://u:p@a:5672/v; amqp://u:p@b:5672/v")
    assert settings.broker_nodes == ("amqp://u:p@a:5672/v", "amqp://u:p@b:5672/v")
    with pytest.raises(ConfigError, match="several separated by ';'"):
        load_settings(broker_url="amqp://u:p@a:5672/v;redis://b")


def test_quorum_queues_need_rabbitmq() -> None:
    with pytest.raises(ConfigError, match="quorum queues need RabbitMQ") as caught:
        load_settings(broker_queue_type="quorum")
    assert caught.value.env == "HUB_BROKER_QUEUE_TYPE"
    assert load_settings(broker_url="amqp://a//", broker_queue_type="quorum").broker_queue_type


def test_every_node_of_a_failover_url_is_shown_without_its_password() -> None:
    url = "amqp://u:secret@a:5672/v;amqp://u:secret@b:5672/v"
    assert redact_url(url) == "amqp://***@a:5672/v;amqp://***@b:5672/v"
    with pytest.raises(ConfigError) as caught:
        load_settings(broker_url=url + ";redis://x")
    assert "secret" not in str(caught.value)
