"""Settings: one frozen object built from defaults, a TOML file and `HUB_*` variables.

Layer: core; imports only `hub.errors` and `hub.payloads`.

Precedence, highest first: explicit overrides (command-line options), `HUB_*`
environment variables, the TOML file named by `--config` or `HUB_CONFIG`,
defaults. Every value is validated at start; a bad one becomes a `ConfigError`
naming the key, its environment variable, the value and what is allowed.
docs/configuration.md lists every setting. The module is longer than our
usual 400 lines because it is one object: every setting, its validation and
its sources in one place.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from hub.errors import ConfigError
from hub.payloads import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    DEFAULT_MAX_PAYLOAD_DEPTH,
    MAX_PAYLOAD_BYTES_CEILING,
    MAX_PAYLOAD_DEPTH_CEILING,
)

ENV_PREFIX = "HUB_"
#: `HUB_*` variables that are not settings: the file's name, and the test suite's own.
_NOT_SETTINGS = ("HUB_CONFIG",)
_RESERVED_PREFIXES = ("HUB_TEST_",)
#: SQLAlchemy's driver for each PostgreSQL client library, preferred first.
_POSTGRES_DRIVERS = (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2"))


def normalise_database_url(url: str, *, key: str = "database_url") -> str:
    """`url` as SQLAlchemy takes it; a ConfigError naming the fix otherwise.

    `postgres://` (as hosting providers print it) and a bare `postgresql://`
    get the installed driver (SQLAlchemy would pick psycopg2 and fail with a
    traceback when only psycopg 3 is installed). The hub stores into SQLite
    and PostgreSQL only.
    """
    env = f"{ENV_PREFIX}{key.upper()}"
    prefix = "db+" if url.startswith("db+") else ""
    bare = url[len(prefix) :]
    scheme, sep, rest = bare.partition("://")
    if not sep:
        raise ConfigError(
            f"{key} / {env} must be a URL such as sqlite:///path/hub.sqlite3 or "
            "postgresql://user:password@host/db",
            key=key,
            env=env,
        )
    if scheme in ("postgres", "postgresql"):
        for module, driver in _POSTGRES_DRIVERS:
            if importlib.util.find_spec(module) is not None:
                return f"{prefix}{driver}://{rest}"
        raise ConfigError(
            f"{key} / {env} names PostgreSQL, but no PostgreSQL driver is installed; "
            "install it with: pip install 'mqtt-hardware-hub[postgres]'",
            key=key,
            env=env,
        )
    if scheme.partition("+")[0] not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"{key} / {env}: database {scheme!r} is not supported; use sqlite:///path "
            "or postgresql://user:password@host/db",
            key=key,
            env=env,
        )
    return url


class TcpListener(BaseModel):
    """One TCP port and the codec it speaks (one port per protocol, as Traccar does)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    port: int = Field(ge=0, le=65535)
    codec: str = "native"
    host: str | None = None
    #: Speak the codec over TLS, with the hub's `tls_*` settings (docs/security.md).
    tls: bool = False


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
    #: Levels allowed in an MQTT topic name or filter; a PUBLISH or SUBSCRIBE beyond is refused.
    mqtt_max_topic_levels: int = Field(default=64, ge=1, le=32767)
    #: Open connections of the embedded broker; beyond it new ones are closed at once.
    mqtt_max_connections: int = Field(default=10_000, ge=1)
    #: MQTT connections in their handshake (CONNECT read to CONNACK sent) at once; more wait.
    mqtt_max_handshakes: int = Field(default=64, ge=1)
    #: QoS 1/2 messages kept for one offline persistent MQTT session; more are dropped.
    mqtt_max_queued_messages: int = Field(default=1000, ge=0)
    #: Port of MQTT over TLS (0: off; off too while `tls_cert_file` is unset).
    mqtt_tls_port: int = Field(default=8883, ge=0, le=65535)
    #: Port of MQTT over WebSockets, path /mqtt, subprotocol mqtt (0: off).
    mqtt_ws_port: int = Field(default=8083, ge=0, le=65535)
    #: Port of MQTT over secure WebSockets (0: off; off too while `tls_cert_file` is unset).
    mqtt_wss_port: int = Field(default=8084, ge=0, le=65535)
    #: TLS of the hub's listeners (docs/security.md): its certificate chain and key (PEM),
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    #: the CA that signs client certificates, and that CA's revocation list.
    tls_ca_file: Path | None = None
    tls_crl_file: Path | None = None
    tls_min_version: Literal["1.2", "1.3"] = "1.2"
    #: Refuse a TLS client that presents no certificate signed by `tls_ca_file`.
    tls_require_certificate: bool = False
    #: A verified client certificate names the device (its CN, or its first DNS SAN).
    tls_identity: Literal["off", "cn", "san"] = "off"
    #: An ACL file in Mosquitto's acl_file syntax (docs/mqtt.md, "ACL file"); SIGHUP reloads it.
    mqtt_acl_file: Path | None = None
    #: Service users in Mosquitto's password file format (docs/security.md); SIGHUP reloads it.
    mqtt_password_file: Path | None = None
    http_port: int = Field(default=8080, ge=0, le=65535)
    #: Port of `hub console`, the web console and HTTP API (a process of its own).
    console_port: int = Field(default=8081, ge=0, le=65535)
    #: How long a console login lasts.
    console_session_hours: float = Field(default=12.0, gt=0)
    #: How often a hub writes its heartbeat row (the console's hubs page and presence).
    hub_heartbeat_s: float = Field(default=5.0, gt=0)
    #: This hub's id in the database (heartbeat, device connections, downlink queue);
    #: unset, each process draws a new one. A set id is refused at start while
    #: another hub with it has a fresh heartbeat (docs/scaling.md).
    hub_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

    idle_timeout_s: float = Field(default=120.0, gt=0)
    #: Time a new TCP connection has to complete its HELLO, however it trickles in.
    hello_timeout_s: float = Field(default=5.0, gt=0)
    #: Open connections per TCP listener; beyond it new ones are closed at once.
    tcp_max_connections: int = Field(default=10_000, ge=1)
    #: Limits per source address, TCP listeners and MQTT alike (docs/security.md,
    #: "Limits per source address"); 0 turns each off.
    max_connects_per_address_per_s: float = Field(default=200.0, ge=0)
    connect_burst_per_address: int = Field(default=400, ge=1)
    max_connections_per_address: int = Field(default=5000, ge=0)
    #: Failed logins from one address within the window before it is refused at accept,
    auth_failures_per_address: int = Field(default=10, ge=0)
    auth_failure_window_s: float = Field(default=60.0, gt=0)
    #: for a delay that doubles with each further failure, up to the maximum.
    auth_backoff_s: float = Field(default=1.0, gt=0)
    auth_backoff_max_s: float = Field(default=60.0, gt=0)
    max_frame_bytes: int = Field(default=65536, ge=64, le=16 * 1024 * 1024)
    max_inflight_per_connection: int = Field(default=256, ge=1)
    #: Deepest nesting of a message's JSON (both transports); deeper is refused.
    max_payload_depth: int = Field(
        default=DEFAULT_MAX_PAYLOAD_DEPTH, ge=1, le=MAX_PAYLOAD_DEPTH_CEILING
    )
    #: Largest JSON payload of one MQTT message (a TCP payload is bounded by its frame).
    max_payload_bytes: int = Field(
        default=DEFAULT_MAX_PAYLOAD_BYTES, ge=64, le=MAX_PAYLOAD_BYTES_CEILING
    )

    batch_max_messages: int = Field(default=500, ge=1, le=10000)
    #: Longest a new batch stays open for more envelopes; within it the window
    #: follows the arrival rate (bridges/batch_window.py). 0: never waits.
    batch_window_ms: float = Field(default=8.0, ge=0)
    #: The batch size the window aims for at the recent arrival rate.
    batch_target_messages: int = Field(default=100, ge=1, le=10000)
    #: Envelopes accepted and not yet durable, on all connections together,
    #: before every device connection stops reading (backpressure, never a
    #: drop; docs/delivery.md, "Bounds and backpressure"). At least two batches.
    dispatch_max_pending_messages: int = Field(default=10_000, ge=1)
    spool_max_messages: int = Field(default=100_000, ge=1)
    broker_retry_interval_s: float = Field(default=1.0, gt=0)
    #: A publish RabbitMQ has not confirmed within this time counts as failed:
    #: the broker is taken as away and the batch goes to the spool.
    broker_confirm_timeout_s: float = Field(default=5.0, gt=0)
    #: AMQP heartbeat of the hub's RabbitMQ connection (0: off); a broker silent
    #: for two heartbeats counts as away even while nothing is published.
    broker_heartbeat_s: float = Field(default=10.0, ge=0)
    #: The type of the hub's task queues on RabbitMQ: "quorum" replicates them
    #: over a cluster's nodes (docs/scaling.md, "A RabbitMQ cluster").
    broker_queue_type: Literal["classic", "quorum"] = "classic"
    #: Quorum queues: deliveries of one message (redeliveries after a worker died
    #: in its task) before RabbitMQ moves it to `hub.undeliverable`.
    broker_delivery_limit: int = Field(default=20, ge=1)
    #: Envelopes per task message when the spool is replayed (spooled batches are merged).
    spool_replay_batch_messages: int = Field(default=5000, ge=1, le=100_000)
    #: Start even if RabbitMQ is unreachable (messages spool until it is back).
    start_without_broker: bool = False
    #: How long a stopping hub lets its worker finish the task in hand before killing it.
    worker_stop_timeout_s: float = Field(default=60.0, gt=0)

    #: Database connections each process keeps open (PostgreSQL; as many again for bursts).
    database_pool_size: int = Field(default=5, ge=1, le=1000)
    #: Telemetry older than this many days is removed (0: kept forever); whole
    #: daily partitions on PostgreSQL, batched deletes on SQLite (docs/scaling.md).
    telemetry_retention_days: int = Field(default=0, ge=0)
    #: The handler-run ledger and finished commands are kept this many days (0: forever).
    handler_runs_retention_days: int = Field(default=0, ge=0)
    commands_retention_days: int = Field(default=0, ge=0)
    #: How long after a telemetry message a device's retransmission of it is recognised.
    retransmission_window_h: float = Field(default=24.0, gt=0)
    #: How often one worker of the fleet runs the periodic upkeep (partitions, retention).
    maintenance_interval_s: float = Field(default=600.0, gt=0)

    handlers: Annotated[tuple[str, ...], NoDecode] = ()
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    #: uvloop where installed ("auto"), or force one.
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"

    @field_validator(
        "broker_url",
        "database_url",
        "result_backend",
        "mqtt_external_url",
        "tls_cert_file",
        "tls_key_file",
        "tls_ca_file",
        "tls_crl_file",
        "mqtt_acl_file",
        "mqtt_password_file",
        mode="before",
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

    @field_validator("mqtt_max_topic_levels")
    @classmethod
    def _room_for_device_topics(cls, value: int, info: ValidationInfo) -> int:
        # <root>/<id>/commands/<command id>/result is the deepest device topic.
        root = info.data.get("mqtt_topic_root")
        needed = (root.count("/") + 1 if isinstance(root, str) else 1) + 4
        if value < needed:
            raise ValueError(f"must be at least {needed} to fit the device topics under the root")
        return value

    @field_validator("database_url", "result_backend")
    @classmethod
    def _database_driver(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        if info.field_name == "result_backend" and not value.startswith("db+"):
            return value  # another Celery result backend (redis://, ...): Celery checks it
        return normalise_database_url(value, key=str(info.field_name))

    @field_validator("broker_url")
    @classmethod
    def _known_broker_scheme(cls, value: str | None) -> str | None:
        if value is None:
            return None
        # Several nodes of a cluster, tried in turn: "amqp://a//;amqp://b//" (kombu's failover).
        nodes = [part.strip() for part in value.split(";")]
        for node in nodes:
            if not node.startswith(("amqp://", "amqps://", "pyamqp://")):
                raise ValueError(
                    "must be an amqp:// URL (RabbitMQ), several separated by ';' for the "
                    "nodes of a cluster, or empty for the embedded default"
                )
        return ";".join(nodes)

    @field_validator("broker_queue_type")
    @classmethod
    def _quorum_needs_rabbitmq(cls, value: str, info: ValidationInfo) -> str:
        # The embedded default's local queue has no queue types.
        if value == "quorum" and info.data.get("broker_url") is None:
            raise ValueError("quorum queues need RabbitMQ: set broker_url / HUB_BROKER_URL")
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
        """The Celery broker: RabbitMQ when configured, else the local queue in the data folder.

        `localqueue://` is the transport of the `localqueue` package (real
        acknowledgement over SQLite; see docs/delivery.md).
        """
        if self.local_queue_path is None:
            return str(self.broker_url)
        return f"localqueue://{self.local_queue_path}"

    @property
    def broker_nodes(self) -> tuple[str, ...]:
        """Each RabbitMQ node `broker_url` lists (one unless it names a cluster's nodes)."""
        return tuple(self.effective_broker_url.split(";"))

    @property
    def local_queue_path(self) -> Path | None:
        """The embedded default's local queue file; None when RabbitMQ is configured."""
        return None if self.broker_url else (self.data_dir / "queue.sqlite3").resolve()

    @property
    def effective_result_backend(self) -> str:
        return self.result_backend or f"db+{self.effective_database_url}"

    @property
    def spool_path(self) -> Path:
        return self.data_dir / "spool.sqlite3"

    @property
    def mqtt_tls_enabled(self) -> bool:
        """MQTT over TLS is served: `mqtt_tls_port` is not 0 and a certificate is set."""
        return self.mqtt_tls_port != 0 and self.tls_cert_file is not None

    @property
    def mqtt_wss_enabled(self) -> bool:
        """Secure WebSockets are served: `mqtt_wss_port` is not 0 and a certificate is set."""
        return self.mqtt_wss_port != 0 and self.tls_cert_file is not None

    @property
    def listeners(self) -> tuple[TcpListener, ...]:
        """The TCP listeners: `tcp_listeners` when given, else native on `tcp_port`."""
        if self.tcp_listeners:
            return self.tcp_listeners
        return (TcpListener(port=self.tcp_port, codec="native"),)

    def to_environment(self) -> dict[str, str]:
        """Every setting as a `HUB_*` variable: a process that loads its settings
        from these (the in-hub worker) gets exactly these values, file included."""
        dumped = self.model_dump(mode="json")
        env: dict[str, str] = {}
        for name, info in type(self).model_fields.items():
            value = dumped[name]
            if value is None:
                continue  # unset; the variable is left out
            if NoDecode in info.metadata:
                text = ",".join(value)  # a comma-separated list (`handlers`)
            elif isinstance(value, (list, dict)):
                text = json.dumps(value)
            elif isinstance(value, bool):
                text = "true" if value else "false"
            else:
                text = str(value)
            env[f"{ENV_PREFIX}{name.upper()}"] = text
        # The child may not share our working directory's meaning of a relative path.
        env[f"{ENV_PREFIX}DATA_DIR"] = str(self.data_dir.resolve())
        return env

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
    # Allow both a flat file and one with a [hub] table (then nothing else).
    hub_table = data.get("hub")
    if not isinstance(hub_table, dict):
        return data
    others = sorted(set(data) - {"hub"})
    if others:
        raise ConfigError(
            f"configuration file {path} has a [hub] table and also {', '.join(others)} "
            "outside it; move every setting into [hub] (or drop the table)",
            key=others[0],
        )
    return dict(hub_table)


def _suggest(name: str, known: list[str]) -> str:
    """ "; did you mean 'x'?" for the nearest known name, or nothing."""
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _setting_env(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper()}"


def _check_environment() -> None:
    """A `HUB_*` variable that names no setting is a typo, not something to ignore."""
    known = {_setting_env(name) for name in Settings.model_fields}
    for name in sorted(os.environ):
        if not name.startswith(ENV_PREFIX) or name in known or name in _NOT_SETTINGS:
            continue
        if name.startswith(_RESERVED_PREFIXES):
            continue
        # Compared without the prefix, which every candidate shares.
        bare = {known_name[len(ENV_PREFIX) :]: known_name for known_name in known}
        bare.update({n[len(ENV_PREFIX) :]: n for n in _NOT_SETTINGS})
        close = difflib.get_close_matches(name[len(ENV_PREFIX) :], sorted(bare), n=1)
        fix = f"did you mean {bare[close[0]]}? Rename it, or unset it" if close else "unset it"
        raise ConfigError(
            f"unknown environment variable {name}; {fix} (settings: docs/configuration.md)",
            env=name,
        )


def redact_url(url: str) -> str:
    """The URL without its credentials (each node's, for several `;`-separated):
    a password must not end up in a terminal or a log."""
    parts = []
    for node in url.split(";"):
        if "://" in node and "@" in node:
            scheme, rest = node.split("://", 1)
            node = f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
        parts.append(node)
    return ";".join(parts)


def _redacted(key: str, value: object) -> object:
    return redact_url(value) if isinstance(value, str) else value


def _describe(error: dict[str, Any], source: str) -> str:
    loc = [str(p) for p in error["loc"]]
    key = ".".join(loc) or "(file)"
    top = loc[0] if loc else ""
    env = _setting_env(top) if top else ""
    value = _redacted(key, error.get("input"))
    if error["type"] == "extra_forbidden":
        model = Settings if len(loc) == 1 else TcpListener
        known = sorted(model.model_fields)
        return (
            f"unknown setting {key!r}{source}{_suggest(loc[-1], known)} "
            "(settings: docs/configuration.md)"
        )
    return f"setting {key!r} ({env}) = {value!r} is invalid: {error['msg']}"


def load_settings(config_file: Path | str | None = None, **overrides: Any) -> Settings:
    """Build the settings; raises ConfigError with a readable message."""
    file_values: dict[str, Any] = {}
    path = config_file or os.environ.get(f"{ENV_PREFIX}CONFIG") or None
    if path:
        file_values = _read_toml(Path(path))
    _check_environment()
    # Environment beats the file; explicit overrides beat both. pydantic-settings
    # gives init values precedence over the environment, so the file's values
    # that the environment also sets are dropped here.
    for name in list(file_values):
        if _setting_env(name) in os.environ:
            del file_values[name]
    values = {**file_values, **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return Settings(**values)
    except ConfigError:
        raise
    except SettingsError as exc:
        raise ConfigError(f"an environment variable could not be read: {exc}") from None
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        key = ".".join(str(p) for p in first["loc"])
        source = f" in {path}" if path else ""
        raise ConfigError(
            "; ".join(_describe(dict(e), source) for e in errors),
            key=key,
            env=_setting_env(str(first["loc"][0])) if first["loc"] else None,
        ) from None
