"""The composition root: builds and runs a whole hub from its settings.

Layer: composition root (`hubapp`); imports the core, `bridges` and (for the
in-hub worker's command line) `tasks.worker`.

Every transport is held through the Protocols of `bridges.transport`: the
TCP listeners, the embedded broker and the external-broker bridge are
`CommandTransport`s (they deliver commands and drop devices; the bridge
drops none, since the external broker holds the connections), and what each
can do is fixed by its type where it is built, not looked up at run time.

`HubApp` starts, on one asyncio loop: the dispatcher (RabbitMQ or the
embedded local queue), one TCP server per configured listener, the MQTT side
(embedded amqtt broker, or a bridge from an external broker) and the HTTP
status endpoint. In the embedded default (no RabbitMQ configured) it also
runs a worker for the local queue (`hubapp.worker_child`): a child process
that is checked before the hub serves, restarted when it dies (but not when
its configuration is wrong: then the hub stops with that error), and stopped
warmly, after the listeners and the dispatcher, so that it finishes the task
in hand.

A little over 400 lines: `HubApp` is the one place where the pieces meet
(start and stop order, commands, control messages, heartbeat, reload,
listeners, readiness and status), and each method is short; the pieces with
a life of their own are modules beside it (`serve`, `worker_child`,
`console_child`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridges.dispatch import Dispatcher, check_broker
from bridges.downlink import Downlink
from bridges.http_status import HttpStatusServer, Readiness
from bridges.tcp import TcpServer, listener_ssl_context
from bridges.tls import reloaded_context, server_context
from bridges.transport import CommandTransport, ListeningTransport, Transport
from bridges.worker_stats import poll as poll_worker_stats
from hub import __version__, hubs
from hub.commands import EXTERNAL_MQTT_LISTENER, PendingCommand, mark_delivered
from hub.control import parse_control
from hub.errors import ConfigError, HubError
from hub.metrics import Metrics
from hub.registry import CredentialCache, Registry
from hub.settings import Settings, redact_url
from hub.storage import make_engine, migrate
from hubapp.worker_child import WorkerChild, check_worker

if TYPE_CHECKING:
    from sqlalchemy import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    host: str
    port: int
    detail: str


class HubApp:
    """A whole hub process. `await start()`, then `await stop()`."""

    def __init__(self, settings: Settings, *, run_worker: bool | None = None) -> None:
        self.settings = settings
        #: The event loop the hub runs on, as /status reports it (set by `start`).
        self.event_loop = "not started"
        self.data_path = prepare_data_dir(settings)
        self.metrics = Metrics()
        self.engine = make_engine(settings.effective_database_url)
        self.registry = Registry(self.engine)
        self.credentials = CredentialCache()
        self.dispatcher = Dispatcher(settings, self.metrics)
        self.downlink = Downlink(settings, self.engine)
        self.tcp_servers: list[TcpServer] = []
        #: The MQTT side: the embedded broker or the external-broker bridge.
        self.mqtt: Transport | None = None
        #: The embedded broker's listener, when the MQTT side is the embedded broker.
        self.mqtt_listener: ListeningTransport | None = None
        #: The embedded broker's ports of MQTT over TLS, WebSockets and secure
        #: WebSockets, for those it serves (status and heartbeat listeners).
        self.mqtt_tls_port: int | None = None
        self.mqtt_ws_port: int | None = None
        self.mqtt_wss_port: int | None = None
        #: The transports that deliver commands and drop devices on request.
        self.command_transports: list[CommandTransport] = []
        self.http: HttpStatusServer | None = None
        #: What SIGHUP reloads (`reload`): the embedded broker's ACL and
        #: password files, and the TLS files of every TLS listener.
        self._reloaders: list[Callable[[], None]] = []
        #: What takes a reloaded SSL context: each TLS listener.
        self._tls_listeners: list[Callable[[ssl.SSLContext], None]] = []
        self._worker: WorkerChild | None = None
        self._heartbeat: asyncio.Future[None] | None = None
        self._beat_write: asyncio.Future[None] | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self._started_at = datetime.now(UTC)
        self._worker_stats: asyncio.Future[None] | None = None
        #: Set when the hub should stop (a signal, or a worker that cannot run).
        self.stop_requested = asyncio.Event()
        #: Why the hub stopped on its own, raised by `serve` once it has stopped.
        self.fatal: HubError | None = None
        # The embedded default runs its own worker; with RabbitMQ, workers are
        # separate `celery -A tasks worker` processes.
        self._run_worker = settings.embedded if run_worker is None else run_worker

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        # Noted here, in the loop: status() may be called from other threads.
        self.event_loop = running_loop_name()
        settings = self.settings
        if settings.mqtt_enabled and not settings.mqtt_external_url and settings.mqtt_tls_enabled:
            # A bad TLS file stops the start before anything else runs.
            server_context(settings)
        for listener in settings.listeners:
            listener_ssl_context(settings, listener)  # the same for TCP over TLS
        # The worker's own check (settings, handler modules) runs while the hub
        # prepares; it must pass before any device is accepted.
        checked = (
            asyncio.ensure_future(asyncio.to_thread(check_worker, self.settings))
            if self._run_worker
            else None
        )
        try:
            await asyncio.to_thread(check_broker, self.settings)
            await asyncio.to_thread(migrate, self.settings.effective_database_url)
            await asyncio.to_thread(refuse_a_taken_hub_id, self.engine, self.settings.hub_id)
            self.credentials.update(await asyncio.to_thread(self.registry.credential_hashes))
        finally:
            if checked is not None:
                await checked
        await self.dispatcher.start()
        try:
            await self.downlink.start()
            for listener in self.settings.listeners:
                server = TcpServer(
                    self.settings,
                    listener,
                    self.dispatcher,
                    self.credentials,
                    self.refresh_credentials,
                    self.metrics,
                    self.downlink,
                )
                await server.start()
                self.tcp_servers.append(server)
                if server.tls:
                    self._tls_listeners.append(server.use_tls_context)
                self._add_command_transport(server)
            if self.settings.mqtt_enabled:
                await self._start_mqtt()
            if self._tls_listeners:
                self._reloaders.append(self._reload_tls)
            self.http = HttpStatusServer(
                self.settings.host,
                self.settings.http_port,
                self.metrics,
                self.status,
                self.readiness,
            )
            await self.http.start()
            self.downlink.on_control(self._on_control)
            self._heartbeat = asyncio.ensure_future(self._beat())
            self._worker_stats = asyncio.ensure_future(poll_worker_stats(self.engine, self.metrics))
            if self._run_worker:
                self._worker = WorkerChild(self.settings, self.data_path, self._worker_unusable)
                self._worker.start()
        except BaseException:
            await self.stop()
            raise

    async def _start_mqtt(self) -> None:
        if self.settings.mqtt_external_url:
            from bridges.mqtt.external import ExternalMqttBridge

            bridge = ExternalMqttBridge(
                self.settings, self.dispatcher, self.metrics, engine=self.engine
            )
            self.mqtt = bridge
            await bridge.start()
            # The bridge's own claim marks its commands delivered, before it
            # publishes (never twice): no second note from the root.
            self._add_command_transport(bridge, notes_delivery=False)
            if self.settings.mqtt_acl_file is not None:
                log.warning("mqtt_acl_file is ignored: the external broker applies its own ACL")
            if self.settings.mqtt_password_file is not None:
                log.warning("mqtt_password_file is ignored: the external broker has its own users")
            return
        from bridges.mqtt.broker import EmbeddedMqtt

        broker = EmbeddedMqtt(
            self.settings,
            self.dispatcher,
            self.credentials,
            self.refresh_credentials,
            self.metrics,
            events=self.downlink,
        )
        self.mqtt = broker
        await broker.start()
        self.mqtt_listener = broker
        self.mqtt_tls_port = broker.tls_port
        self.mqtt_ws_port = broker.ws_port
        self.mqtt_wss_port = broker.wss_port
        if self.mqtt_tls_port is not None or self.mqtt_wss_port is not None:
            self._tls_listeners.append(broker.use_tls_context)
        if self.settings.mqtt_acl_file is not None or self.settings.mqtt_password_file is not None:
            self._reloaders.append(broker.reload_access)
        self._add_command_transport(broker)

    def _add_command_transport(
        self, transport: CommandTransport, *, notes_delivery: bool = True
    ) -> None:
        """Commands from the downlink go to `transport`, which may also drop devices.
        With `notes_delivery`, a command it delivered is marked so in the database."""
        self.command_transports.append(transport)
        deliver = transport.deliver_command
        self.downlink.add_transport(self._noting_delivery(deliver) if notes_delivery else deliver)

    # -- commands, control messages and the heartbeat (what the console sees) ----

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _noting_delivery(
        self, deliver: Callable[[PendingCommand], bool]
    ) -> Callable[[PendingCommand], bool]:
        """Wrap a transport's delivery so that a delivered command says so in the database."""

        def noted(command: PendingCommand) -> bool:
            if not deliver(command):
                return False
            self._spawn(self._mark_delivered(command.id))
            return True

        return noted

    async def _mark_delivered(self, command_id: str) -> None:
        try:
            await asyncio.to_thread(mark_delivered, self.engine, command_id)
        except Exception:  # boundary: the status is informative; the command is on its way
            log.exception("could not record the delivery of command %s", command_id)

    def _on_control(self, body: dict[str, Any]) -> None:
        control = parse_control(body)
        if control is None:
            log.warning("dropping an unknown control message: %r", body)
            return
        self._spawn(self._disconnect(control.device_id, control.reason))

    async def _disconnect(self, device_id: str, reason: str) -> None:
        """Reload the device's credential, then drop its connections on every transport."""
        try:
            await self.refresh_credentials(device_id)
        except Exception:  # boundary: the registry is away; still drop the connection
            log.exception("could not reload the credential of %r", device_id)
            self.credentials.forget(device_id)
        closed = 0
        for transport in self.command_transports:
            closed += await transport.disconnect_device(device_id)
        if closed:
            log.info("device %r disconnected (%s)", device_id, reason or "control message")

    def heartbeat(self) -> hubs.Heartbeat:
        status = self.status()
        mqtt = status["devices_connected"]["mqtt"]
        return hubs.Heartbeat(
            hub_id=self.downlink.hub_id,
            version=__version__,
            mode=self.mode(),
            hostname=socket.gethostname(),
            pid=os.getpid(),
            listeners=status["listeners"],
            devices_tcp=int(status["devices_connected"]["tcp"]),
            devices_mqtt=int(mqtt or 0),
            spool_messages=int(status["spool_messages"]),
            broker_connected=bool(status["broker_connected"]),
            heartbeat_s=self.settings.hub_heartbeat_s,
            started_at=self._started_at,
        )

    async def _beat(self) -> None:
        while True:
            # Shielded: a write under way when the hub stops finishes before the
            # row is removed (stop() waits for it), so no stale row is left.
            self._beat_write = asyncio.ensure_future(
                asyncio.to_thread(hubs.beat, self.engine, self.heartbeat())
            )
            try:
                await asyncio.shield(self._beat_write)
            except asyncio.CancelledError:
                raise
            except Exception:  # boundary: the database is away; the next beat tries again
                log.exception("could not write the hub's heartbeat")
            await asyncio.sleep(self.settings.hub_heartbeat_s)

    def _reload_tls(self) -> None:
        """Read the TLS files again into one new context for every TLS listener;
        when one no longer loads, all keep the context they have (one line logged)."""
        context = reloaded_context(self.settings)
        if context is not None:
            for use in self._tls_listeners:
                use(context)

    def reload(self) -> None:
        """Reload what can change while the hub runs (SIGHUP): the MQTT ACL and
        password files and the TLS files (certificate, key, CA, CRL). No
        connection is dropped; a file that no longer loads leaves what is in
        force and logs why."""
        if not self._reloaders:
            log.info("reload requested (SIGHUP): nothing to reload")
        for reload in self._reloaders:
            try:
                reload()
            except Exception:  # boundary: a reload must never stop the hub
                log.exception("reload failed")

    def _worker_unusable(self, error: ConfigError) -> None:
        """The in-hub worker's configuration is invalid: stop the hub with its error."""
        self.fatal = error
        self.stop_requested.set()

    async def stop(self) -> None:
        if self._worker_stats is not None:
            self._worker_stats.cancel()
            self._worker_stats = None
        if self._worker is not None:
            self._worker.stop_supervising()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
            if self._beat_write is not None:
                await asyncio.gather(self._beat_write, return_exceptions=True)
            try:
                await asyncio.to_thread(hubs.gone, self.engine, self.downlink.hub_id)
            except Exception:  # boundary: the row then ages out (three missed beats)
                log.exception("could not remove the hub's heartbeat row")
        for server in self.tcp_servers:
            await server.stop()
        self.tcp_servers.clear()
        self.command_transports.clear()
        self._reloaders.clear()
        self._tls_listeners.clear()
        if self.mqtt is not None:
            await self.mqtt.stop()
            self.mqtt = None
            self.mqtt_listener = None
        await self.dispatcher.stop()
        await self.downlink.stop()
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self._worker is not None:
            await self._worker.stop()
            self._worker = None
        self.engine.dispose()

    # -- services for the bridges ------------------------------------------------

    async def refresh_credentials(self, device_id: str) -> None:
        """Load one device's credential hash from the database into the cache."""
        hashes = await asyncio.to_thread(self.registry.credential_hashes, [device_id])
        if hashes:
            self.credentials.update(hashes)
        else:
            self.credentials.forget(device_id)

    # -- what it shows -----------------------------------------------------------

    def listeners(self) -> list[Listener]:
        found = [
            Listener(
                f"tcp/{s.codec_name}{'+tls' if s.tls else ''}",
                s.host,
                s.port,
                f"devices speaking {s.codec_name}{' over TLS' if s.tls else ''}",
            )
            for s in self.tcp_servers
        ]
        if self.mqtt_listener is not None:
            port = self.mqtt_listener.port
            found.append(Listener("mqtt", self.settings.host, port, "embedded broker"))
            for name, extra_port, what in (
                ("mqtt-tls", self.mqtt_tls_port, "MQTT over TLS"),
                ("mqtt-ws", self.mqtt_ws_port, "MQTT over WebSockets"),
                ("mqtt-wss", self.mqtt_wss_port, "MQTT over secure WebSockets"),
            ):
                if extra_port is not None:
                    found.append(Listener(name, self.settings.host, extra_port, what))
        if self.settings.mqtt_enabled and self.settings.mqtt_external_url:
            # Named so in the heartbeat: send_command hands such a hub the
            # commands of devices no hub holds (hub.commands).
            from bridges.mqtt.external import parse_broker_url

            host, port, *_ = parse_broker_url(self.settings.mqtt_external_url)
            found.append(
                Listener(EXTERNAL_MQTT_LISTENER, host, port, "bridge from an external broker")
            )
        if self.http is not None:
            found.append(
                Listener(
                    "http", self.settings.host, self.http.port, "/healthz /readyz /status /metrics"
                )
            )
        return found

    def mode(self) -> str:
        if self.settings.embedded:
            return f"embedded (local queue in {self.settings.data_dir}, in-hub worker)"
        worker = "in-hub worker" if self._run_worker else "separate `celery -A tasks worker`"
        return f"RabbitMQ at {redact_url(self.settings.broker_url or '')}, {worker}"

    def _sample(self, name: str) -> float:
        return float(self.metrics.registry.get_sample_value(name) or 0.0)

    def readiness(self) -> Readiness:
        """Not ready while envelopes spool (the task broker is away or its backlog
        replays) or while a listener is down (docs/delivery.md, "Health")."""
        reasons = []
        listeners = len(self.settings.listeners)
        serving = sum(1 for server in self.tcp_servers if server.serving)
        if serving < listeners:
            reasons.append(f"{listeners - serving} of {listeners} TCP listeners not serving")
        if self.settings.mqtt_enabled and (self.mqtt is None or not self.mqtt.serving):
            what = "external MQTT broker" if self.settings.mqtt_external_url else "MQTT broker"
            reasons.append(f"{what} not serving")
        spooled = int(self._sample("hub_spool_messages"))
        if spooled:
            reasons.append(f"spooling: {spooled} envelopes wait in the local spool")
        tried = self._sample("hub_batches_published_total") + self._sample(
            "hub_envelopes_spooled_total"
        )
        if tried and not self._sample("hub_broker_connected"):
            reasons.append("task broker unreachable")
        return Readiness(tuple(reasons))

    def status(self) -> dict[str, Any]:
        connections = sum(s.connected_devices for s in self.tcp_servers)
        mqtt_clients = self.mqtt.connected_devices if self.mqtt is not None else None
        return {
            "version": __version__,
            "mode": self.mode(),
            "event_loop": self.event_loop,
            "listeners": [asdict(x) for x in self.listeners()],
            "devices_connected": {"tcp": connections, "mqtt": mqtt_clients},
            "dispatch_pending": self.dispatcher.pending,
            "spool_messages": int(self._sample("hub_spool_messages")),
            "broker_connected": bool(self._sample("hub_broker_connected")),
            "workers": self.metrics.worker_counts.snapshot(),
        }


def running_loop_name() -> str:
    """`uvloop` or `asyncio`: the event loop this hub really runs on (`event_loop =
    auto` picks uvloop where installed), as /status and the startup lines report it."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.split(".")[0] == "uvloop" else "asyncio"


def prepare_data_dir(settings: Settings) -> Path:
    """Create the data folder; a ConfigError if it cannot be created or written."""
    data_dir = settings.data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(data_dir, os.W_OK):
            raise PermissionError(13, "permission denied")
    except OSError as exc:
        reason = exc.strerror or "not writable"
        raise ConfigError(
            f"data folder {data_dir.resolve()} cannot be used ({reason.lower()}); "
            "choose another with data_dir / HUB_DATA_DIR",
            key="data_dir",
            env="HUB_DATA_DIR",
        ) from None
    return data_dir.resolve()


def _process_runs(pid: int) -> bool:
    """Whether a process of this host has `pid` (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return pid != os.getpid()


def refuse_a_taken_hub_id(engine: Engine, hub_id: str | None) -> None:
    """A set `hub_id` that a running hub already writes heartbeats under stops
    the start, before this hub touches its devices or its downlink queue. A
    row left by a process of this host that no longer runs (a SIGKILL, then
    a restart) does not count: that hub is gone."""
    if hub_id is None:
        return
    found = hubs.holder(engine, hub_id)
    if found is None:
        return
    beat = found.beat
    if beat.hostname == socket.gethostname() and not _process_runs(beat.pid):
        return
    age = (datetime.now(UTC) - found.last_heartbeat).total_seconds()
    raise ConfigError(
        f"hub_id {hub_id!r} is in use by a running hub (pid {beat.pid} on "
        f"{beat.hostname}, heartbeat {age:.0f} s ago); give each hub its own "
        "hub_id / HUB_HUB_ID",
        key="hub_id",
        env="HUB_HUB_ID",
    )
