"""Starting `hub console` as a child process beside a hub (for `hub demo`).

Layer: composition root (it starts the `hub` command; it imports no layer
above the core).

The console is always a process of its own, never inside the hub: the child
gets the hub's settings through `HUB_*` variables, a free port of the hub's
host, and a login made for it (`demo`, admin, a new password each run).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from hub import accounts
from hub.settings import Settings
from hub.storage import make_engine

DEMO_USER = "demo"


@dataclass
class ConsoleChild:
    process: subprocess.Popen[bytes]
    url: str
    user: str
    password: str
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def demo_login(settings: Settings) -> str:
    """A fresh password for the `demo` admin (the user is made again each run)."""
    engine = make_engine(settings.effective_database_url)
    try:
        accounts.remove_user(engine, DEMO_USER)
        return accounts.add_user(engine, DEMO_USER, "admin")
    finally:
        engine.dispose()


def start_console(settings: Settings, *, ready_timeout_s: float = 30.0) -> ConsoleChild:
    """Start `hub console` for these settings and wait until it answers /healthz."""
    password = demo_login(settings)
    host = settings.host
    port = _free_port(host)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env.update(
        HUB_DATA_DIR=str(settings.data_dir.resolve()),
        HUB_DATABASE_URL=settings.effective_database_url,
        HUB_RESULT_BACKEND=settings.effective_result_backend,
        HUB_HOST=host,
        HUB_CONSOLE_PORT=str(port),
        HUB_LOG_LEVEL="WARNING",
    )
    if settings.broker_url:
        env["HUB_BROKER_URL"] = settings.broker_url
    log_path = settings.data_dir / "console.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", "from hubapp.cli import main; main()", "console"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl+C goes to the demo, which stops it in order
        )
    url = f"http://{host}:{port}/"
    child = ConsoleChild(process, url, DEMO_USER, password, log_path)
    deadline = time.monotonic() + ready_timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}healthz", timeout=2) as answer:
                if answer.status == 200:
                    return child
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    child.stop()
    raise RuntimeError(f"the console did not start (see {log_path})")
