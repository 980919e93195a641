"""Settings: one frozen object built from defaults, a TOML file and `HUB_*` variables.

Layer: core; imports only `hub.errors`.

Precedence, highest first: explicit overrides (command-line options), `HUB_*`
environment variables, the TOML file named by `--config` or `HUB_CONFIG`,
defaults. Every value is validated at start; a bad one becomes a `ConfigError`
naming the key, its environment variable, the value and what is allowed.
docs/configuration.md lists every setting.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from hub.errors import ConfigError

ENV_PREFIX = "HUB_"


class TcpListener(BaseModel):
    """One TCP port and the codec it speaks (one port per protocol, as Traccar does)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    port: int = Field(ge=0, le=65535)
    codec: str = "native"
    host: str | None = None


class Settings(BaseSettings):
    """Every setting of the hub. Field names are the TOML keys; `HUB_<NAME>` overrides."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", validate_default=True
    )

    data_dir: Path = Path("hub-data")
    broker_url: str | None = None
    database_url: str | None = None
    result_backend: str | None = None

    host: str = "0.0.0.0"
    tcp_port: int = Field(default=7700, ge=0, le=65535)
    tcp_listeners: tuple[TcpListener, ...] = ()
    mqtt_enabled: bool = True
    mqtt_port: int = Field(default=1883, ge=0, le=65535)
    mqtt_allow_anonymous: bool = False
    #: Instead of embedding a broker, bridge from this external one (mqtt://user:pass@host:port).
    mqtt_external_url: str | None = None
    #: Shared-subscription group of the external bridge ($share/<group>/...).
    mqtt_shared_group: str = "hub"
    #: First topic level of device topics: <root>/<device id>/telemetry ...
    mqtt_topic_root: str = Field(default="devices", min_length=1, pattern=r"^[^#+]+$")
    mqtt_max_packet_bytes: int = Field(default=256 * 1024, ge=1024)
    mqtt_connect_timeout_s: float = Field(default=10.0, gt=0)
    #: QoS 1/2 messages kept for one offline persistent MQTT session; more are dropped.
    mqtt_max_queued_messages: int = Field(default=1000, ge=0)
    http_port: int = Field(default=8080, ge=0, le=65535)

    idle_timeout_s: float = Field(default=120.0, gt=0)
    max_frame_bytes: int = Field(default=65536, ge=64, le=16 * 1024 * 1024)
    max_inflight_per_connection: int = Field(default=256, ge=1)

    batch_max_messages: int = Field(default=500, ge=1, le=10000)
    batch_window_ms: float = Field(default=2.0, ge=0)
    spool_max_messages: int = Field(default=100_000, ge=1)
    broker_retry_interval_s: float = Field(default=1.0, gt=0)
    #: A publish RabbitMQ has not confirmed within this time counts as failed:
    #: the broker is taken as away and the batch goes to the spool.
    broker_confirm_timeout_s: float = Field(default=5.0, gt=0)
    #: AMQP heartbeat of the hub's RabbitMQ connection (0: off); a broker silent
    #: for two heartbeats counts as away even while nothing is published.
    broker_heartbeat_s: float = Field(default=10.0, ge=0)
    #: Envelopes per task message when the spool is replayed (spooled batches are merged).
    spool_replay_batch_messages: int = Field(default=5000, ge=1, le=100_000)
    #: Start even if RabbitMQ is unreachable (messages spool until it is back).
    start_without_broker: bool = False

    handlers: Annotated[tuple[str, ...], NoDecode] = ()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: uvloop where installed ("auto"), or force one.
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"

    @field_validator(
        "broker_url", "database_url", "result_backend", "mqtt_external_url", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("handlers", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        # HUB_HANDLERS=a.b,c.d as well as a JSON list or a TOML array.
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("broker_url")
    @classmethod
    def _known_broker_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("amqp://", "amqps://", "pyamqp://")):
            raise ValueError("must be an amqp:// URL (RabbitMQ), or empty for the embedded default")
        return value

    # -- derived values ----------------------------------------------------

    @property
    def embedded(self) -> bool:
        """True when no RabbitMQ is configured: tasks run on a local durable queue."""
        return self.broker_url is None

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'hub.sqlite3').resolve()}"

    @property
    def effective_broker_url(self) -> str:
        """The Celery broker: RabbitMQ when configured, else a SQLite queue in the data folder."""
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'queue.sqlite3').resolve()}"

    @property
    def effective_result_backend(self) -> str:
        return self.result_backend or f"db+{self.effective_database_url}"

    @property
    def spool_path(self) -> Path:
        return self.data_dir / "spool.sqlite3"

    @property
    def listeners(self) -> tuple[TcpListener, ...]:
        """The TCP listeners: `tcp_listeners` when given, else native on `tcp_port`."""
        if self.tcp_listeners:
            return self.tcp_listeners
        return (TcpListener(port=self.tcp_port, codec="native"),)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file is passed in as init values by `load_settings`, below the
        # overrides; environment variables sit between the two.
        return (init_settings, env_settings)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist", env="HUB_CONFIG") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    # Allow both a flat file and one with a [hub] table.
    hub_table = data.get("hub")
    return dict(hub_table) if isinstance(hub_table, dict) else data


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(file)"
    top = str(error["loc"][0]) if error["loc"] else ""
    env = f"{ENV_PREFIX}{top.upper()}" if top else ""
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        return f"unknown setting {key!r} (see docs/configuration.md for the settings)"
    return f"setting {key!r} ({env}) = {value!r} is invalid: {error['msg']}"


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings; raises ConfigError with a readable message."""
    file_values: dict[str, Any] = {}
    path = config_file or os.environ.get(f"{ENV_PREFIX}CONFIG") or None
    if path:
        file_values = _read_toml(Path(path))
    # Environment beats the file; explicit overrides beat both. pydantic-settings
    # gives init values precedence over the environment, so the file's values
    # that the environment also sets are dropped here.
    for name in list(file_values):
        if f"{ENV_PREFIX}{name.upper()}" in os.environ:
            del file_values[name]
    values = {**file_values, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return Settings(**values)
    except SettingsError as exc:
        raise ConfigError(f"an environment variable could not be read: {exc}") from None
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ConfigError(
            "; ".join(_describe(dict(e)) for e in errors),
            key=key,
            env=f"{ENV_PREFIX}{str(first['loc'][0]).upper()}" if first["loc"] else None,
        ) from None
