"""`hub demo`: a whole hub and a simulated fleet of both transports, with a live view.

Layer: composition root (`hubapp.demo`), like `hubapp.app` and `hubapp.cli`:
it imports the hub core, `hubapp.app` (and through it `bridges`), `tasks` and
`firmware_sim`, which no other layer may combine. What it shows is drawn by
`hubapp.demo.view`.

Over 400 lines on purpose: `Demo` is one object with one lifecycle (start,
fleets, commands, sampling, summary) whose steps share its state; cutting it
into modules would only pass that state around.

The web console (`hub console`) runs beside it as a child process of its own,
and the header prints its address and a login. One process runs everything
else on one event loop: the hub (`HubApp`, with its
worker child in the embedded default), a TCP fleet and an MQTT fleet from the
firmware simulator, a sampler that reads what the worker stored, and the view.
Midway it sends `ping` and `set_interval` to the first device of each
transport through the public `send_command` API and waits for the replies.
At the end (the duration, or Ctrl+C) the devices stop and drain their
acknowledgements, the demo waits for the worker to store what was
acknowledged, stops the hub and prints a summary.

By default the hub listens on free ports of 127.0.0.1 and keeps its data in a
temporary folder that is removed afterwards, so a demo never collides with a
running hub. The other settings (a RabbitMQ URL, a database URL, handlers) are
the user's own.

The view (`hubapp.demo.view`) is redrawn in place with ANSI cursor movement
when the output is a terminal, and degrades to one plain status line every two
seconds otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from firmware_sim.fleet import FleetOptions, FleetStats, FleetSummary, device_ids, run_fleet
from firmware_sim.provision import provision_devices
from hub.errors import CommandExpired, ConfigError
from hub.settings import Settings
from hub.storage import count_rows, device_state
from hubapp.app import HubApp, prepare_data_dir
from hubapp.console_child import ConsoleChild, start_console
from hubapp.demo.view import (
    MQTT_PREFIX,
    TCP_PREFIX,
    CommandOutcome,
    DeviceRow,
    Display,
    Snapshot,
    TransportRow,
    TtyDisplay,
    is_terminal,
    render_summary,
)

__all__ = ["Demo", "DemoOptions", "demo_overrides", "run"]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"

#: A command's time to live; the demo waits a little longer, so that a device
#: that never answers shows the hub's own expiry message rather than a timeout.
COMMAND_TTL_S = 10.0
COMMAND_WAIT_S = COMMAND_TTL_S + 5.0
#: How long stopping devices may wait for their outstanding acknowledgements.
DRAIN_S = 10.0
#: How long the demo waits, after the devices stopped, for the worker to store
#: every acknowledged message.
STORE_WAIT_S = 30.0
#: Devices per transport whose last values the view shows.
WATCHED_PER_TRANSPORT = 2

SAMPLE_S = 1.0


@dataclass(frozen=True)
class DemoOptions:
    duration_s: float = 20.0
    devices: int = 5
    rate: float = 5.0
    data_dir: Path | None = None
    as_json: bool = False
    verbose: bool = False


def demo_overrides(data_dir: Path) -> dict[str, Any]:
    """The settings the demo always overrides: free ports on 127.0.0.1 (MQTT over
    WebSockets off), its data folder.

    One native listener replaces any configured `tcp_listeners`, because the
    simulated devices speak the native protocol and the configured ports may
    belong to a running hub.
    """
    return {
        "data_dir": data_dir,
        "host": HOST,
        "tcp_port": 0,
        "tcp_listeners": (),
        "mqtt_port": 0,
        # 0 is off here (not a free port): the demo's devices speak MQTT over TCP.
        "mqtt_ws_port": 0,
        "mqtt_wss_port": 0,
        "http_port": 0,
    }


# ---------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------


@dataclass
class _Transport:
    """One transport's fleet and what the demo knows of it."""

    name: str
    prefix: str
    devices: int
    stats: FleetStats = field(default_factory=FleetStats)
    available: bool = True
    reason: str = ""
    port: int = 0
    credentials: dict[str, str] = field(default_factory=dict)
    baseline_rows: int = 0
    stored: int = 0
    summary: FleetSummary | None = None
    task: asyncio.Task[FleetSummary] | None = None
    samples: collections.deque[tuple[float, int]] = field(
        default_factory=lambda: collections.deque(maxlen=64)
    )

    def rate(self, now: float) -> float:
        """Acknowledged messages per second over about the last two seconds."""
        self.samples.append((now, self.stats.acknowledged))
        while len(self.samples) > 2 and now - self.samples[1][0] >= 2.0:
            self.samples.popleft()
        (t0, n0), (t1, n1) = self.samples[0], self.samples[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


class Demo:
    """One run of the demo: `await run()` returns the summary (the `--json` object)."""

    def __init__(
        self,
        settings: Settings,
        make_settings: Callable[[dict[str, Any]], Settings],
        options: DemoOptions,
        out: TextIO,
    ) -> None:
        self.settings = settings
        self.make_settings = make_settings
        self.options = options
        self.display: Display = TtyDisplay(out) if is_terminal(out) else Display(out)
        self.transports = [
            _Transport("tcp", TCP_PREFIX, options.devices),
            _Transport("mqtt", MQTT_PREFIX, options.devices),
        ]
        self.app: HubApp | None = None
        self.console: ConsoleChild | None = None
        self.console_line = ""
        self.mode = ""
        self.listeners = ""
        self.phase = "starting"
        self.commands: list[CommandOutcome] = []
        self.device_rows: list[DeviceRow] = []
        self.last_values: dict[str, dict[str, Any]] = {}
        self.interrupted = asyncio.Event()
        self.hurry = asyncio.Event()  # a second Ctrl+C: skip the remaining waits
        self.stop_devices = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._started = 0.0
        self._ended: float | None = None  # when the devices were done and all was stored

    # -- the whole run -----------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        self._started = loop.time()
        loop.add_signal_handler(signal.SIGINT, self._on_signal)
        loop.add_signal_handler(signal.SIGTERM, self._on_signal)
        # The terminal was closed: nobody is watching, end as fast as is clean.
        loop.add_signal_handler(signal.SIGHUP, self._on_signal, True)
        try:
            return await self._run()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    def _on_signal(self, hurry: bool = False) -> None:
        if hurry or self.interrupted.is_set():
            self.hurry.set()
        self.interrupted.set()

    async def _run(self) -> dict[str, Any]:
        # Before provisioning: an unusable folder is one clear line, not a traceback.
        prepare_data_dir(self.settings)
        ids = {t.name: device_ids(t.prefix, t.devices) for t in self.transports}
        credentials = await asyncio.to_thread(
            provision_devices, ids["tcp"] + ids["mqtt"], settings=self.settings
        )
        for t in self.transports:
            t.credentials = {d: credentials[d] for d in ids[t.name]}
        app = await self._start_hub()
        self.app = app
        background: list[asyncio.Task[Any]] = []
        try:
            await self._start_console()
            self._describe_hub(app)
            await self._baselines(app)
            self.display.begin(self._header())
            loop = asyncio.get_running_loop()
            self._started = loop.time()  # the duration counts from the first device
            self._start_fleets(app)
            self.phase = "running"
            background = [
                asyncio.create_task(self._sample_forever(app)),
                asyncio.create_task(self._show_forever()),
            ]
            commands = asyncio.create_task(self._send_commands())
            await self._until(self._started + self.options.duration_s, self.interrupted)
            if not commands.done() and not self.interrupted.is_set():
                self._set_phase("waiting for command replies")
                await self._first(commands, self.interrupted)
            if self.interrupted.is_set():
                self._set_phase("interrupted; stopping devices")
            else:
                self._set_phase("stopping devices")
            self.stop_devices.set()
            await asyncio.gather(commands, return_exceptions=True)
            await self._finish_fleets()
            self._set_phase("waiting for the worker to store what was acknowledged")
            await self._wait_stored(app)
            self._ended = loop.time()
            self._check_fleets()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            background = []
            self.display.frame(self.snapshot())
            # The worker's warm shutdown takes a few seconds: say what is going on.
            self._set_phase("stopping the hub")
            summary = self.summary(app)
        finally:
            for task in background:
                task.cancel()
            try:
                self.stop_devices.set()
                await self._finish_fleets()
                if self.console is not None:
                    await asyncio.to_thread(self.console.stop)
                await app.stop()
                self.phase = "interrupted" if self.interrupted.is_set() else "done"
                self.display.end(self.snapshot())
            finally:
                self.display.restore()
        return summary

    def _set_phase(self, phase: str) -> None:
        self.phase = phase
        self.display.event(self.snapshot(), phase)

    async def _start_hub(self) -> HubApp:
        """Start the hub; without its MQTT side if that cannot start, saying why."""
        settings = self.settings
        mqtt = self.transports[1]
        reason = ""
        if not settings.mqtt_enabled:
            reason = "disabled in the settings (mqtt_enabled)"
        elif settings.mqtt_external_url:
            reason = (
                "the settings bridge an external broker (mqtt_external_url); "
                "the demo simulates devices on the embedded broker only"
            )
        if reason:
            settings = self._without_mqtt()
        else:
            app = HubApp(settings, run_worker=True)
            try:
                await app.start()
                return app
            except ConfigError:
                raise
            except Exception as exc:  # boundary: show the hub working without MQTT
                log.debug("the MQTT side did not start", exc_info=True)
                reason = f"the embedded broker did not start ({type(exc).__name__}: {exc})"
                settings = self._without_mqtt()
        mqtt.available, mqtt.reason = False, reason
        app = HubApp(settings, run_worker=True)
        await app.start()
        return app

    async def _start_console(self) -> None:
        """The web console beside the hub, as its own process; the demo goes on without it."""
        try:
            self.console = await asyncio.to_thread(start_console, self.settings)
        except Exception as exc:  # boundary: the fleet demo does not need the console
            log.debug("the console did not start", exc_info=True)
            self.console_line = f"console   unavailable: {exc}"
            return
        c = self.console
        self.console_line = f"console   {c.url}  (log in as {c.user} / {c.password})"

    def _without_mqtt(self) -> Settings:
        data_dir = self.settings.data_dir
        return self.make_settings({**demo_overrides(data_dir), "mqtt_enabled": False})

    def _describe_hub(self, app: HubApp) -> None:
        self.mode = app.mode()
        # "tcp/native" -> "tcp": the demo has one listener per transport.
        self.listeners = "  ".join(
            f"{x.name.split('/')[0]} {x.host}:{x.port}" for x in app.listeners()
        )
        tcp, mqtt = self.transports
        tcp.port = app.tcp_servers[0].port
        if mqtt.available and app.mqtt_listener is not None:
            mqtt.port = app.mqtt_listener.port

    async def _baselines(self, app: HubApp) -> None:
        # A reused --data-dir holds earlier runs' rows under the same device ids.
        for t in self.transports:
            t.baseline_rows = await asyncio.to_thread(
                count_rows, app.engine, device_prefix=t.prefix
            )

    def _header(self) -> list[str]:
        o = self.options
        lines = [
            f"hub demo: {o.devices} device{'s' if o.devices > 1 else ''} per transport, "
            f"{o.rate:g} msg/s each, for {o.duration_s:g} s (Ctrl+C ends it early)",
            f"mode      {self.mode}",
            f"listening {self.listeners}",
        ]
        if self.console_line:
            lines.append(self.console_line)
        for t in self.transports:
            if not t.available:
                lines.append(f"{t.name:<9} unavailable: {t.reason}")
        if not isinstance(self.display, TtyDisplay):
            lines.append(
                "every 2 s: devices online/total, acked msg/s, rows stored/acked, commands"
            )
        return lines

    def _start_fleets(self, app: HubApp) -> None:
        tcp, mqtt = self.transports
        for t in self.transports:
            t.samples.append((self._started, 0))  # the first rate is then since the start
        for t in self.transports:
            if t is mqtt and not mqtt.available:
                continue
            options = FleetOptions(
                transport="tcp" if t is tcp else "mqtt",
                host=HOST,
                port=t.port,
                devices=list(t.credentials.items()),
                rate=self.options.rate,
                drain_timeout_s=DRAIN_S,
                # A demo that cannot connect should say so within the run, not after a minute.
                give_up_s=20.0,
                topic_root=app.settings.mqtt_topic_root,
            )
            t.task = asyncio.create_task(run_fleet(options, stop=self.stop_devices, stats=t.stats))

    async def _finish_fleets(self) -> None:
        for t in self.transports:
            if t.task is None or t.summary is not None:
                continue
            try:
                t.summary = await t.task
            except Exception as exc:  # boundary: a crashed fleet is a result to show
                t.available = False
                t.reason = f"the simulated fleet failed ({type(exc).__name__}: {exc})"

    def _check_fleets(self) -> None:
        for t in self.transports:
            if t.available and t.stats.connected == 0 and t.stats.devices:
                t.available = False
                t.reason = (
                    f"no device could connect ({t.stats.errors} errors, "
                    f"{t.stats.refused} refused: {dict(t.stats.refused_reasons) or 'no reason'})"
                )

    # -- commands ------------------------------------------------------------------

    async def _send_commands(self) -> None:
        import tasks.application

        tasks.application.configure(self.settings)
        # Connect to the broker and the result backend now, while the devices
        # connect, so that the first round trip measures the command, not that.
        with contextlib.suppress(Exception):  # a real problem shows in the command
            await asyncio.to_thread(_warm_up, tasks.application.app)
        loop = asyncio.get_running_loop()
        # Commands go to connected devices and their replies are completed by
        # the worker: wait until the devices are online and the worker has
        # stored something (it takes a few seconds to boot), so that the round
        # trip measures the command. But not for ever: a transport whose
        # devices never connect shows its commands expiring.
        deadline = self._started + max(2.0, self.options.duration_s / 2)
        while loop.time() < deadline and not self.interrupted.is_set():
            if not any(
                t.available and (t.stats.online < t.devices or t.stored == 0)
                for t in self.transports
            ):
                break
            await asyncio.sleep(0.1)
        slower = 2.0 / self.options.rate
        for t in self.transports:
            if t.available:
                device = f"{t.prefix}1"
                self.commands.append(CommandOutcome(t.name, device, "ping", {}))
                self.commands.append(
                    CommandOutcome(t.name, device, "set_interval", {"seconds": round(slower, 3)})
                )
        by_transport: dict[str, list[CommandOutcome]] = collections.defaultdict(list)
        for c in self.commands:
            by_transport[c.transport].append(c)
        await asyncio.gather(*(self._command_sequence(cs) for cs in by_transport.values()))

    async def _command_sequence(self, outcomes: list[CommandOutcome]) -> None:
        """One device's commands in turn; after one without a reply, skip the rest
        (waiting for each to expire in turn would only prolong the demo)."""
        skip = ""
        for outcome in outcomes:
            if self.interrupted.is_set():
                skip = skip or "interrupted"
            if skip:
                outcome.status, outcome.error = "not sent", skip
                continue
            await self._command(outcome)
            self.display.event(self.snapshot(), self._command_event(outcome))
            if outcome.status in ("no reply", "not sent"):
                skip = f"no reply to {outcome.name}"

    def _command_event(self, c: CommandOutcome) -> str:
        rtt = "" if c.round_trip_s is None else f" ({c.round_trip_s:.2f} s)"
        return f"command {c.name} {c.device_id}{rtt}: {c.reply_text()}"

    async def _command(self, outcome: CommandOutcome) -> None:
        from celery.exceptions import TimeoutError as ResultTimeout

        from tasks import send_command

        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            # One at a time: the Celery producer pool is shared by the threads.
            async with self._send_lock:
                result = await asyncio.to_thread(
                    send_command, outcome.device_id, outcome.name, outcome.args, COMMAND_TTL_S
                )
        except Exception as exc:  # boundary: show why the command could not be sent
            outcome.status, outcome.error = "not sent", str(exc)
            return
        outcome.status = "waiting"
        # Poll rather than block in `result.get`, so that Ctrl+C is not held up
        # by a thread waiting for a reply.
        while not await asyncio.to_thread(result.ready):
            if self.interrupted.is_set():
                outcome.status, outcome.error = "interrupted", "no reply yet"
                return
            if loop.time() - started > COMMAND_WAIT_S:
                outcome.status = "no reply"
                outcome.error = f"nothing within {COMMAND_WAIT_S:g} s"
                return
            await asyncio.sleep(0.05)
        # Rounded once, so that the view and the summary show the same figure.
        outcome.round_trip_s = round(loop.time() - started, 3)
        try:
            value = await asyncio.to_thread(result.get, timeout=5, propagate=False)
        except ResultTimeout:
            outcome.status, outcome.error = "failed", "the result could not be read"
            return
        if isinstance(value, CommandExpired):
            outcome.status, outcome.error = "no reply", str(value)
        elif isinstance(value, BaseException):
            outcome.status, outcome.error = "failed", str(value)
        else:
            outcome.status, outcome.result = "ok", value

    # -- sampling and showing --------------------------------------------------------

    def _watched(self) -> list[str]:
        watched = []
        for t in self.transports:
            if t.available:
                watched += device_ids(t.prefix, min(t.devices, WATCHED_PER_TRANSPORT))
        return watched

    async def _sample(self, app: HubApp) -> None:
        watched = self._watched()

        def read() -> tuple[list[int], list[dict[str, Any] | None]]:
            counts = [count_rows(app.engine, device_prefix=t.prefix) for t in self.transports]
            return counts, [device_state(app.engine, d) for d in watched]

        counts, states = await asyncio.to_thread(read)
        for t, count in zip(self.transports, counts, strict=True):
            t.stored = count - t.baseline_rows
        now = datetime.now(UTC)
        rows = []
        for device_id, state in zip(watched, states, strict=True):
            if state is None:
                continue
            values = dict(state["last_values"] or {})
            seen = state["last_seen_at"]
            rows.append(
                DeviceRow(device_id, values, (now - seen).total_seconds() if seen else None)
            )
            self.last_values[device_id] = values
        self.device_rows = rows

    async def _sample_forever(self, app: HubApp) -> None:
        while True:
            try:
                await self._sample(app)
            except Exception:  # boundary: a busy database must not end the demo
                log.debug("sampling the database failed", exc_info=True)
            await asyncio.sleep(SAMPLE_S)

    async def _show_forever(self) -> None:
        while True:
            await asyncio.sleep(self.display.refresh_s)
            self.display.frame(self.snapshot())

    def _elapsed(self) -> float:
        now = self._ended if self._ended is not None else asyncio.get_running_loop().time()
        return max(now - self._started, 0.0)

    def snapshot(self) -> Snapshot:
        now = asyncio.get_running_loop().time()
        app = self.app
        rows = []
        for t in self.transports:
            online = t.stats.online
            if app is not None and t.name == "tcp" and app.tcp_servers:
                online = sum(len(s.devices) for s in app.tcp_servers)  # the hub's own count
            elif app is not None and t.name == "mqtt" and app.mqtt is not None:
                counted = app.mqtt.connected_devices  # None only for an external broker
                online = online if counted is None else counted
            rows.append(
                TransportRow(
                    name=t.name,
                    available=t.available,
                    reason=t.reason,
                    devices=t.devices,
                    online=online,
                    rate_per_s=t.rate(now),
                    sent=t.stats.sent,
                    acknowledged=t.stats.acknowledged,
                    stored=t.stored,
                    errors=t.stats.errors,
                )
            )
        notes = self.display.notes if isinstance(self.display, TtyDisplay) else ()
        return Snapshot(
            elapsed_s=self._elapsed(),
            duration_s=self.options.duration_s,
            phase=self.phase,
            mode=self.mode,
            listeners=self.listeners,
            transports=rows,
            devices=list(self.device_rows),
            commands=list(self.commands),
            notes=notes,
        )

    # -- waiting -------------------------------------------------------------------

    async def _until(self, deadline: float, event: asyncio.Event) -> None:
        """Sleep until `deadline` (loop time) or until `event` is set."""
        delay = deadline - asyncio.get_running_loop().time()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), delay)

    async def _first(self, task: asyncio.Task[Any], event: asyncio.Event) -> None:
        """Wait for `task` to finish or `event` to be set, whichever comes first."""
        waiter = asyncio.create_task(event.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()

    async def _wait_stored(self, app: HubApp) -> None:
        """Until every acknowledged message is stored, for at most STORE_WAIT_S."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STORE_WAIT_S
        while loop.time() < deadline and not self.hurry.is_set():
            await self._sample(app)
            if all(t.stored >= t.stats.acknowledged for t in self.transports if t.available):
                return
            await self._until(min(loop.time() + 0.5, deadline), self.hurry)

    # -- the result ------------------------------------------------------------------

    def summary(self, app: HubApp) -> dict[str, Any]:
        transports: dict[str, Any] = {}
        problems = []
        for t in self.transports:
            hub_acked = app.metrics.registry.get_sample_value(
                "hub_messages_acked_total", {"transport": t.name}
            )
            entry: dict[str, Any] = {
                "available": t.available,
                "reason": t.reason or None,
                "devices": t.devices,
                "connected": t.stats.connected,
                "sent": t.stats.sent,
                "acknowledged": t.stats.acknowledged,
                "hub_acknowledged": int(hub_acked or 0),
                "stored": t.stored,
                "refused": t.stats.refused,
                "errors": t.stats.errors,
            }
            transports[t.name] = entry
            # More stored than acknowledged is no loss: a device that stopped
            # before its last acknowledgement arrived (delivery is at least once).
            if t.available and t.stored < t.stats.acknowledged:
                problems.append(
                    f"{t.name}: {t.stored} stored of {t.stats.acknowledged} acknowledged"
                )
        if not transports["tcp"]["available"]:
            problems.append(f"tcp: {transports['tcp']['reason']}")
        return {
            "duration_s": round(self._elapsed(), 3),
            "interrupted": self.interrupted.is_set(),
            "mode": self.mode,
            "devices_per_transport": self.options.devices,
            "rate_per_device": self.options.rate,
            "transports": transports,
            "commands": [c.to_dict() for c in self.commands],
            "last_values": dict(self.last_values),
            "ok": not problems,
            "problem": "; ".join(problems) or None,
            "data_dir": str(self.options.data_dir.resolve()) if self.options.data_dir else None,
            "console": self.console.url if self.console is not None else None,
        }


def _warm_up(app: Any) -> None:
    """Open the Celery app's broker connection and result backend (blocking)."""
    with app.producer_or_acquire() as producer:
        producer.connection.ensure_connection(max_retries=1)
    app.backend.get_task_meta("demo-warm-up")


def run(make_settings: Callable[[dict[str, Any]], Settings], options: DemoOptions) -> int:
    """Run the demo; the exit status (0 when every acknowledged message was stored).

    `make_settings(overrides)` builds the user's settings with the demo's
    overrides on top (the `hub` command passes its own `_settings`).
    """
    if not options.verbose:
        # The view is the output; routine INFO lines (connections, the broker
        # starting) would only interleave with it.
        logging.getLogger().setLevel(logging.WARNING)
    temporary = None
    data_dir = options.data_dir
    if data_dir is None:
        temporary = Path(tempfile.mkdtemp(prefix="hub-demo-"))
        data_dir = temporary
    out = sys.stderr if options.as_json else sys.stdout
    try:
        settings = make_settings(demo_overrides(data_dir))
        demo = Demo(settings, make_settings, options, out)
        summary = asyncio.run(demo.run())
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    with contextlib.suppress(OSError):  # the output is gone (see Display.emit)
        if options.as_json:
            print(json.dumps(summary, separators=(",", ":")), flush=True)
        else:
            terminal = is_terminal(out)
            width = max(shutil.get_terminal_size((80, 24)).columns - 1, 40) if terminal else 79
            print("\n".join(render_summary(summary, width)), flush=True)
    return 0 if summary["ok"] else 1
