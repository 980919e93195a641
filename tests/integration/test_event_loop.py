"""The hub reports the event loop it really runs on, in its startup lines and in
/status, and the benchmark's way of starting it (bench.hub_process) gets the loop
it asks for: it once asked for asyncio and printed so while the hub ran uvloop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support.processes import ROOT, wait_until
from tests.support.services import free_port

pytestmark = pytest.mark.integration


def _start(command: list[str], data_dir: Path, http_port: int, **env: str) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    environ.update({"HUB_DATA_DIR": str(data_dir), "HUB_HOST": "127.0.0.1", **env})
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "firmware-sim")])
    argv = [
        sys.executable, *command, "run", "--no-mqtt", "--no-worker",
        "--tcp-port", str(free_port()), "--http-port", str(http_port),
    ]  # fmt: skip
    with (data_dir / "hub.log").open("w") as log:
        return subprocess.Popen(
            argv, cwd=ROOT, env=environ, stdout=log, stderr=subprocess.STDOUT, text=True
        )


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.mark.parametrize(
    ("command", "env", "expected"),
    [
        (["-m", "hubapp.cli"], {"HUB_EVENT_LOOP": "asyncio"}, "asyncio"),
        (["-m", "hubapp.cli"], {}, "uvloop"),  # auto, and uvloop is a test dependency
        (["-m", "bench.hub_process", "--loop", "asyncio"], {}, "asyncio"),
        (["-m", "bench.hub_process", "--loop", "uvloop"], {}, "uvloop"),
    ],
)
def test_the_hub_reports_the_loop_it_runs_on(
    tmp_path: Path, command: list[str], env: dict[str, str], expected: str
) -> None:
    http_port = free_port()
    hub = _start(command, tmp_path, http_port, **env)
    log = tmp_path / "hub.log"
    try:
        started = wait_until(lambda: "Press Ctrl+C" in log.read_text(), timeout=60)
        assert started, log.read_text()
        assert f"  loop         {expected}\n" in log.read_text()
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/status", timeout=10) as r:
            assert json.load(r)["event_loop"] == expected
    finally:
        _stop(hub)
