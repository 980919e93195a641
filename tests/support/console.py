"""`hub console` as a real child process, and an HTTP client that logs in like a person.

The console gets the same settings as the test's hubs and workers (database,
RabbitMQ vhost, result backend) through `HUB_*` variables, as in production.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from hub import accounts
from hub.settings import Settings
from hub.storage import make_engine
from tests.support.processes import ROOT, settings_env
from tests.support.services import free_port


def hub_command() -> list[str]:
    """The `hub` command of this environment."""
    script = Path(sys.executable).with_name("hub")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from hubapp.cli import main; main()"]


class ConsoleProcess:
    """`hub console` on a free port of 127.0.0.1; `stop()` ends it."""

    def __init__(self, settings: Settings, log_path: Path, port: int | None = None) -> None:
        self.settings = settings
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("ab")
        env = settings_env(settings)
        env["HUB_HOST"] = "127.0.0.1"
        env["HUB_CONSOLE_PORT"] = str(self.port)
        self.process = subprocess.Popen(
            [*hub_command(), "console"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"hub console exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"hub console not ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def make_token(settings: Settings, name: str, role: str) -> str:
    engine = make_engine(settings.effective_database_url)
    try:
        return accounts.add_token(engine, name, role)
    finally:
        engine.dispose()


def make_user(settings: Settings, name: str, role: str) -> str:
    engine = make_engine(settings.effective_database_url)
    try:
        return accounts.add_user(engine, name, role)
    finally:
        engine.dispose()


def api(console: ConsoleProcess, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=console.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env: dict[str, Any] = settings_env(settings)
    return subprocess.run(
        [*hub_command(), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
