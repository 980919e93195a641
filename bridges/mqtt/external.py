"""External-broker mode: bridge device messages from an MQTT broker the hub does not embed.

Layer: bridges; imports the `hub` core, `bridges.transport`,
`bridges.mqtt.tap` (the shared uplink and acknowledgement rule), paho-mqtt
and SQLAlchemy (an engine, for the delivery claim of `hub.commands`).

When `mqtt_external_url` is set (e.g. `mqtt://user:pass@127.0.0.1:1883`), the
hub embeds no broker. `ExternalMqttBridge` subscribes at QoS 1 to every
device's uplink topics inside the shared-subscription group
`$share/<mqtt_shared_group>/...`, so several hubs split the messages between
them, each message going to one of them.

Acknowledgement: paho runs with `manual_ack=True`, so a QoS 1 message is not
acknowledged when it arrives. Its PUBACK to the broker goes out only once the
dispatcher's future for it resolved (the envelope is durable, judged by
`bridges.mqtt.tap.may_acknowledge`, as for the embedded broker); a message that
never becomes durable is never acknowledged, and the broker delivers it again
when this client id reconnects (clean session 0). Devices and their
authentication and ACL are the external broker's business.

Commands: the bridge is a `CommandTransport`. The hub cannot see which
devices are connected to the external broker, so `deliver_command` accepts
every command it is handed: it claims the command in the database
(`hub.commands.claim_delivery`, pending -> delivered, at most one winner
across all hubs) and only then publishes it to `<root>/<id>/commands` at
QoS 1. The broker queues it in the device's persistent session when the
device is offline; a device without one misses it, and the command's time to
live fails it, as for any command nobody answers. Results come back on
`<root>/<id>/commands/<command id>/result`, inside the shared subscription
(`hub.topics.uplink_filters`), and go to the workers like any uplink.

Threads: paho's network thread (`loop_start`) receives; each message is
handed to the event loop with `call_soon_threadsafe`, validated and submitted
there, and acknowledged from there (`Client.ack` is safe to call from another
thread). While the dispatcher is full, paho's thread waits before handing
the next message over (and so stops reading the broker's socket). Packet ids
are reused by the broker after a reconnect, so an
acknowledgement is only sent on the connection that received the message;
after a reconnect the broker resends whatever was not acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import ssl
import threading
import time
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy import Engine

from bridges.mqtt.tap import MqttUplink, may_acknowledge
from bridges.transport import EnvelopeSink
from hub.commands import PendingCommand, claim_delivery
from hub.errors import ConfigError, EnvelopeError
from hub.metrics import Metrics
from hub.settings import Settings
from hub.topics import PayloadLimits, command_message, command_topic, uplink_filters

log = logging.getLogger(__name__)

_KEEPALIVE_S = 30
_RECONNECT_MIN_S, _RECONNECT_MAX_S = 1, 30
#: How often a full dispatcher is looked at again while paho's thread waits for room.
_ROOM_POLL_S = 0.02
#: How long `stop()` waits for messages already submitted to become durable
#: (and be acknowledged) before disconnecting.
_DRAIN_TIMEOUT_S = 5.0
_SCHEMES = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883}


def parse_broker_url(url: str) -> tuple[str, int, str | None, str | None, bool]:
    """(host, port, username, password, tls) of an `mqtt://` or `mqtts://` URL."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _url_error(url, str(exc)) from None
    if parts.scheme not in _SCHEMES:
        raise _url_error(url, "the scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise _url_error(url, "it names no host")
    if parts.path not in ("", "/"):
        raise _url_error(url, "it must not have a path")
    return (
        parts.hostname,
        port or _SCHEMES[parts.scheme],
        unquote(parts.username) if parts.username is not None else None,
        unquote(parts.password) if parts.password is not None else None,
        parts.scheme in ("mqtts", "ssl"),
    )


def _url_error(url: str, why: str) -> ConfigError:
    shown = url.split("@", 1)[-1] if "@" in url else url  # never echo a password
    return ConfigError(
        f"mqtt_external_url ({shown}) is invalid: {why}; expected "
        "mqtt://[user:password@]host[:port]",
        key="mqtt_external_url",
        env="HUB_MQTT_EXTERNAL_URL",
    )


def default_client_id(settings: Settings) -> str:
    """A client id that is the same every time this hub (host and data folder)
    starts, and differs between hubs: the broker keeps the session, with its
    unacknowledged messages, for exactly this hub."""
    where = f"{socket.gethostname()}\x00{settings.data_dir.resolve()}"
    return f"hub-bridge-{hashlib.sha256(where.encode()).hexdigest()[:16]}"


class ExternalMqttBridge:
    """Bridges device messages from an external MQTT broker to the dispatcher,
    and publishes commands there (a `bridges.transport.CommandTransport`).

    `engine` is the database the delivery claims are made in; without it the
    bridge delivers no command.
    """

    #: The transport's name in logs, metrics and status.
    name = "mqtt"

    def __init__(
        self,
        settings: Settings,
        dispatcher: EnvelopeSink,
        metrics: Metrics,
        *,
        client_id: str | None = None,
        drain_timeout_s: float = _DRAIN_TIMEOUT_S,
        engine: Engine | None = None,
    ) -> None:
        if not settings.mqtt_external_url:
            raise ConfigError(
                "external MQTT mode needs mqtt_external_url",
                key="mqtt_external_url",
                env="HUB_MQTT_EXTERNAL_URL",
            )
        self._host, self._port, username, password, tls = parse_broker_url(
            settings.mqtt_external_url
        )
        self._settings = settings
        self._metrics = metrics
        self._uplink = MqttUplink(
            dispatcher,
            metrics,
            settings.mqtt_topic_root,
            PayloadLimits(settings.max_payload_depth, settings.max_payload_bytes),
        )
        self._drain_timeout_s = drain_timeout_s
        self._engine = engine
        self._commands: set[asyncio.Future[None]] = set()
        #: Commands this bridge claimed and handed to paho for the broker.
        self.commands_published = 0
        self.client_id = client_id or default_client_id(settings)
        group = settings.mqtt_shared_group
        self.subscriptions = [
            f"$share/{group}/{f}" for f in uplink_filters(settings.mqtt_topic_root)
        ]

        self._loop: asyncio.AbstractEventLoop | None = None
        # Bumped on every connect and disconnect; a message is acknowledged only
        # while the connection it came on is still the current one.
        self._connection = 0
        self._connection_lock = threading.Lock()
        self._ready = threading.Event()  # connected and subscribed
        self._refusal: ReasonCode | None = None
        self._closing = False
        self._pending: set[asyncio.Future[None]] = set()
        self._subscribe_mids: set[int] = set()

        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=False,
            manual_ack=True,
        )
        if username is not None:
            client.username_pw_set(username, password)
        if tls:
            client.tls_set_context(ssl.create_default_context())
        client.reconnect_delay_set(_RECONNECT_MIN_S, _RECONNECT_MAX_S)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client

    # -- lifecycle (event loop) ----------------------------------------------------

    async def start(self) -> None:
        """Connect and subscribe; waits up to `mqtt_connect_timeout_s` for that.

        A refused CONNACK (bad credentials) is a ConfigError. An unreachable
        broker is not: the bridge keeps trying in the background and logs it.
        """
        self._loop = asyncio.get_running_loop()
        self._client.connect_async(self._host, self._port, keepalive=_KEEPALIVE_S)
        self._client.loop_start()
        ready = await asyncio.to_thread(self._ready.wait, self._settings.mqtt_connect_timeout_s)
        if self._refusal is not None:
            await self._shutdown_client()
            raise ConfigError(
                f"the MQTT broker at {self._host}:{self._port} refused the hub: "
                f"{self._refusal}; check the user and password in mqtt_external_url",
                key="mqtt_external_url",
                env="HUB_MQTT_EXTERNAL_URL",
            )
        if ready:
            log.info(
                "bridging MQTT from %s:%d as %s (%s)",
                self._host,
                self._port,
                self.client_id,
                ", ".join(self.subscriptions),
            )
        else:
            log.warning(
                "the MQTT broker at %s:%d is not reachable yet; retrying in the background",
                self._host,
                self._port,
            )

    @property
    def ready(self) -> bool:
        """Connected and subscribed."""
        return self._ready.is_set()

    @property
    def serving(self) -> bool:
        """Devices' messages reach the hub: connected and subscribed (for /readyz)."""
        return self.ready

    @property
    def connected_devices(self) -> None:
        """Unknown: devices connect to the external broker, not to the hub."""
        return None

    async def stop(self) -> None:
        """Stop taking messages, acknowledge those that become durable within a
        few seconds, then disconnect. The broker keeps the rest for this client id."""
        self._closing = True
        if self._commands:
            await asyncio.wait(set(self._commands), timeout=self._drain_timeout_s)
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=self._drain_timeout_s)
        await self._shutdown_client()

    async def _shutdown_client(self) -> None:
        self._client.disconnect()
        # loop_stop joins paho's thread: not on the event loop.
        await asyncio.to_thread(self._client.loop_stop)

    # -- commands (event loop) ---------------------------------------------------------

    def deliver_command(self, command: PendingCommand) -> bool:
        """Accept `command` for the external broker; False only when this bridge
        cannot publish at all (no database, not started, stopping).

        The hub cannot know whether the device is connected to the broker, so
        acceptance says nothing about it: the claim and the QoS 1 publish run in
        the background (module docstring, "Commands"). A command claimed
        already (by this hub or another) is not published again.
        """
        if self._engine is None or self._loop is None or self._closing:
            return False
        task = asyncio.ensure_future(self._publish_command(command, self._engine))
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)
        return True

    async def _publish_command(self, command: PendingCommand, engine: Engine) -> None:
        try:
            topic = command_topic(self._settings.mqtt_topic_root, command.device_id)
            payload = command_message(command.id, command.name, command.args)
        except (EnvelopeError, TypeError, ValueError) as exc:
            log.error("command %s cannot be sent over MQTT: %s", command.id, exc)
            return
        try:
            claimed = await asyncio.to_thread(claim_delivery, engine, command.id)
        except Exception:  # boundary: the database is away; the command expires at its TTL
            log.exception("could not claim command %s for the external broker", command.id)
            return
        if not claimed:
            log.info("command %s was delivered, answered or expired already", command.id)
            return
        # Thread-safe; while disconnected paho keeps a QoS 1 message and sends
        # it after the reconnect.
        info = self._client.publish(topic, payload, qos=1)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            log.error("command %s not published to %s: %s", command.id, topic, info.rc)
            return
        self.commands_published += 1
        log.info("command %s published to %s", command.id, topic)

    async def disconnect_device(self, device_id: str) -> int:
        """Always 0: over an external broker the hub holds no device connection
        and cannot drop one; the broker's own authentication and ACL decide who
        stays connected (docs/mqtt.md, "External-broker mode")."""
        return 0

    # -- paho's network thread --------------------------------------------------------

    def _next_connection(self) -> None:
        with self._connection_lock:
            self._connection += 1

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        self._next_connection()
        if reason.is_failure:
            self._refusal = reason
            log.error(
                "the MQTT broker at %s:%d refused the hub: %s", self._host, self._port, reason
            )
            client.disconnect()  # no point retrying with the same credentials
            self._ready.set()
            return
        # Subscribing again on every connect is harmless with a kept session and
        # needed when the broker lost it.
        result, mid = client.subscribe([(topic_filter, 1) for topic_filter in self.subscriptions])
        if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
            self._subscribe_mids.add(mid)

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: Any, mid: int, codes: list[ReasonCode], _p: Any
    ) -> None:
        if mid not in self._subscribe_mids:
            return
        self._subscribe_mids.discard(mid)
        refused = [f for f, code in zip(self.subscriptions, codes, strict=False) if code.is_failure]
        if refused:
            log.error(
                "the MQTT broker refused the subscriptions %s (does it support shared "
                "subscriptions, and may this user read them?)",
                ", ".join(refused),
            )
        self._ready.set()

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _p: Any
    ) -> None:
        self._next_connection()
        self._ready.clear()
        if not self._closing and reason.is_failure:
            log.warning(
                "lost the MQTT broker at %s:%d (%s); reconnecting", self._host, self._port, reason
            )

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return  # not acknowledged: the broker delivers it again
        room = self._uplink.room
        while room.full and not self._closing:
            # The hub holds its most envelopes (bridges.backpressure): stop
            # reading the broker's socket, as the device listeners do. A flag
            # read across threads, and a short sleep: paho has no pause.
            time.sleep(_ROOM_POLL_S)
        with self._connection_lock:
            connection = self._connection
        # A loop closed meanwhile raises RuntimeError: not acknowledged either.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._bridge, message, connection)

    # -- the event loop ------------------------------------------------------------------

    def _bridge(self, message: mqtt.MQTTMessage, connection: int) -> None:
        if self._closing:
            return  # the broker keeps it for this client id
        try:
            future = self._uplink.submit(message.topic, message.payload, sender=None)
        except Exception:
            # The boundary with paho: a bug here leaves the message unacknowledged.
            log.exception("MQTT bridge failed on a message on %s", message.topic)
            self._metrics.protocol_errors.labels("mqtt", "bridge_error").inc()
            return
        if future is None:
            # Not ours or invalid (counted): acknowledging it is final, since
            # delivering it again would fail the same way.
            self._ack(message, connection, durable=False)
            return
        self._pending.add(future)
        future.add_done_callback(lambda f: self._durable(f, message, connection))

    def _durable(
        self, future: asyncio.Future[None], message: mqtt.MQTTMessage, connection: int
    ) -> None:
        self._pending.discard(future)
        if may_acknowledge(future, f"topic={message.topic}"):
            self._ack(message, connection, durable=True)

    def _ack(self, message: mqtt.MQTTMessage, connection: int, *, durable: bool) -> None:
        if message.qos == 0:
            return
        # Checked and sent under the lock, so that a reconnect cannot slip in
        # between. No deadlock: paho calls on_connect/on_disconnect holding
        # only its in-callback lock, which `ack` never takes.
        with self._connection_lock:
            if connection != self._connection:
                return  # another connection now: its packet ids mean other messages
            self._client.ack(message.mid, message.qos)
        if durable:
            self._metrics.messages_acked.labels("mqtt").inc()
