"""Real processes and loops for the integration tests: a Celery worker, a hub in a
background event loop, and a TCP proxy whose link can be cut."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from hub.settings import Settings, load_settings
from hubapp.app import HubApp
from tasks.worker import celery_worker_command, worker_environment

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes another process (a worker, the CLI) use these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env["HUB_DATA_DIR"] = str(settings.data_dir)
    env["HUB_DATABASE_URL"] = settings.effective_database_url
    env["HUB_RESULT_BACKEND"] = settings.effective_result_backend
    if settings.broker_url:
        env["HUB_BROKER_URL"] = settings.broker_url
    if settings.handlers:
        env["HUB_HANDLERS"] = ",".join(settings.handlers)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "firmware-sim")])
    return env


class Worker:
    """`celery -A tasks worker` as a real child process."""

    def __init__(self, settings: Settings, log_path: Path, concurrency: int = 1) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            celery_worker_command(
                concurrency=concurrency,
                loglevel="INFO",
                heartbeat=False,
                hostname=f"test-{os.getpid()}-{time.monotonic_ns()}@%h",
            ),
            cwd=ROOT,
            env=worker_environment(settings, python_path=[str(ROOT), str(ROOT / "firmware-sim")]),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log_path.read_text()[-3000:]}")
            if b" ready." in self.log_path.read_bytes():
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready in {timeout} s:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class HubThread:
    """A `HubApp` running on its own event loop in a background thread."""

    def __init__(self, settings: Settings, **app_options: Any) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.app = HubApp(settings, **app_options)
        try:
            self.call(self.app.start())
        except BaseException:
            self._shutdown_loop()
            raise

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, func: Callable[[], T], timeout: float = 10) -> T:
        async def run() -> T:
            return func()

        return self.call(run(), timeout)

    @property
    def tcp_port(self) -> int:
        return self.app.tcp_servers[0].port

    def tcp_port_of(self, codec: str) -> int:
        return next(s.port for s in self.app.tcp_servers if s.codec_name == codec)

    @property
    def mqtt_port(self) -> int:
        return int(self.app.mqtt.port)

    def counter(self, name: str, **labels: str) -> float:
        value = self.app.metrics.registry.get_sample_value(name, labels or None)
        return float(value or 0.0)

    def stop(self) -> None:
        try:
            self.call(self.app.stop())
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class CuttableProxy:
    """A TCP forwarder to a real service whose link the test can cut and restore.

    Cutting closes every forwarded connection and stops accepting, which is
    what the hub sees when RabbitMQ goes away.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.restore()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    def restore(self) -> None:
        async def start() -> int:
            self._server = await asyncio.start_server(
                self._handle, "127.0.0.1", self.port, reuse_address=True
            )
            return int(self._server.sockets[0].getsockname()[1])

        self.port = self._run(start())

    def cut(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
                self._server = None
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()

        self._run(stop())

    def close(self) -> None:
        self.cut()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def make_test_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a hub on free ports of 127.0.0.1, no environment or file involved."""
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "host": "127.0.0.1",
        "tcp_port": 0,
        "mqtt_port": 0,
        # 0 turns these off (not a free port): a test that wants them picks free ports.
        "mqtt_ws_port": 0,
        "mqtt_wss_port": 0,
        "http_port": 0,
        "mqtt_enabled": False,
        "broker_retry_interval_s": 0.3,
    }
    values.update(overrides)
    return load_settings(None, **values)


def wait_until(predicate: Callable[[], bool], timeout: float = 60, interval: float = 0.2) -> bool:
    """Poll `predicate` until it holds or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class SimulatedDevice:
    """A long-lived simulated device (firmware_sim) on its own loop in a thread.

    It connects, answers commands and pings, and reconnects when dropped,
    until `stop()`.
    """

    def __init__(
        self,
        transport: str,
        port: int,
        device_id: str,
        credential: str,
        *,
        messages: int | None = 0,
        rate: float = 0.0,
        host: str = "127.0.0.1",
        topic_root: str = "devices",
    ) -> None:
        from firmware_sim import fleet

        self.loop = asyncio.new_event_loop()
        self._stop_event: asyncio.Event | None = None
        options = fleet.FleetOptions(
            transport=transport,
            host=host,
            port=port,
            devices=[(device_id, credential)],
            messages=messages,
            rate=rate,
            linger=True,
            topic_root=topic_root,
        )

        async def main() -> Any:
            self._stop_event = asyncio.Event()
            return await fleet.run_fleet(options, stop=self._stop_event)

        self._future = asyncio.run_coroutine_threadsafe(main(), self.loop)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def stop(self) -> Any:
        if self._stop_event is not None:
            self.loop.call_soon_threadsafe(self._stop_event.set)
        try:
            return self._future.result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
            self.loop.close()
