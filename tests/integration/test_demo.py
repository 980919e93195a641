"""`hub demo` as a user runs it: a real hub, its worker child and simulated
devices of both transports, with the output piped (so the plain lines, not the
terminal view), on free ports and a temporary data folder."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hub.storage import count_rows, make_engine
from hubapp.demo import (
    CommandOutcome,
    DeviceRow,
    Snapshot,
    TransportRow,
    render_frame,
    render_status_line,
    render_summary,
)
from tests.support.processes import ROOT

pytestmark = pytest.mark.integration

# Command replies to MQTT devices are not asserted: the demo shows whatever
# the hub answers (a reply, or the expiry), and the MQTT side may be off.
STATUSES = {"ok", "failed", "no reply", "not sent", "interrupted"}


def _demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    # The demo uses its own data folder; this one only catches a demo that
    # would write to the user's configured folder instead.
    env["HUB_DATA_DIR"] = str(tmp_path / "user-data")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "firmware-sim")])
    return subprocess.run(
        [sys.executable, "-m", "hubapp.cli", "demo", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_demo_prints_plain_progress_and_a_summary(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo-data"
    result = _demo(tmp_path, "--duration", "6", "--devices", "2", "--data-dir", str(data_dir))
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "\x1b" not in out, "terminal control codes in piped output"
    assert all(len(line) <= 79 for line in out.splitlines()), out

    assert re.search(r"^\s+\d+\.\ds  tcp \d/2 [\d.]+/s stored \d+/\d+  mqtt ", out, re.M), out
    assert "summary: ran for" in out
    row = re.search(r"^tcp\s+2/2\s+(\d+)\s+(\d+)\s+(\d+)\s+0\s+0$", out, re.M)
    assert row is not None, out
    sent, acked, stored = map(int, row.groups())
    assert sent == acked == stored > 0
    assert re.search(r"^ping\s+demo-tcp-1\s+[\d.]+ s\s+\{\"pong\": true", out, re.M), out
    assert re.search(r"^set_interval\s+demo-tcp-1\s+[\d.]+ s\s+\{\"interval_s\": ", out, re.M)
    assert "result: ok, every acknowledged message was stored" in out
    assert re.search(r"^console   http://127\.0\.0\.1:\d+/  \(log in as demo / \S+\)$", out, re.M)

    # --data-dir keeps the data, readable like any hub's; nothing went to HUB_DATA_DIR.
    engine = make_engine(f"sqlite:///{data_dir / 'hub.sqlite3'}")
    assert count_rows(engine, device_prefix="demo-tcp-") == stored
    assert not (tmp_path / "user-data").exists()


def test_demo_json_summary(tmp_path: Path) -> None:
    result = _demo(tmp_path, "--duration", "4", "--devices", "1", "--rate", "4", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    summary = json.loads(lines[0])

    assert summary["ok"] is True and summary["interrupted"] is False
    tcp = summary["transports"]["tcp"]
    assert tcp["available"] is True
    assert tcp["sent"] == tcp["acknowledged"] == tcp["stored"] == tcp["hub_acknowledged"] > 0
    mqtt = summary["transports"]["mqtt"]
    assert mqtt["available"] is True, mqtt.get("reason")
    assert mqtt["sent"] == mqtt["acknowledged"] == mqtt["stored"] > 0

    by_name = {(c["transport"], c["command"]): c for c in summary["commands"]}
    ping = by_name["tcp", "ping"]
    assert ping["status"] == "ok" and ping["result"]["pong"] is True
    assert ping["round_trip_s"] > 0
    assert by_name["tcp", "set_interval"]["result"] == {"interval_s": 0.5}
    assert by_name["mqtt", "ping"]["status"] == "ok"
    assert by_name["mqtt", "ping"]["result"]["pong"] is True
    assert all(c["status"] in STATUSES for c in summary["commands"])
    assert summary["last_values"]["demo-tcp-1"].keys() >= {"temperature", "battery"}

    # The temporary data folder (named in the mode) is gone.
    folder = re.search(r"local queue in (\S+),", summary["mode"])
    assert folder is not None, summary["mode"]
    assert not Path(folder.group(1)).exists()
    # The live view went to stderr, as plain lines.
    assert "every 2 s:" in result.stderr


def test_ctrl_c_ends_the_demo_early_with_the_summary(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "firmware-sim")])
    process = subprocess.Popen(
        [sys.executable, "-m", "hubapp.cli", "demo", "--duration", "300", "--devices", "1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        seen = []
        for line in process.stdout:  # the first status line: devices are sending
            seen.append(line)
            if " cmds " in line:
                break
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    out = "".join(seen) + rest
    assert process.returncode == 0, out
    assert "summary: interrupted after" in out
    assert "result: ok, every acknowledged message was stored" in out


def _snapshot(phase: str = "running") -> Snapshot:
    long_reply = CommandOutcome(
        "tcp", "demo-tcp-1", "ping", {}, "ok", {"pong": True, "x": "y" * 90}
    )
    return Snapshot(
        elapsed_s=12.3,
        duration_s=20.0,
        phase=phase,
        mode="embedded (local queue in /tmp/" + "d" * 80 + ", in-hub worker)",
        listeners="tcp 127.0.0.1:40001  mqtt 127.0.0.1:40002  http 127.0.0.1:40003",
        transports=[
            TransportRow("tcp", True, "", 500, 500, 2500.0, 999999, 999999, 999998, 0),
            TransportRow(
                "mqtt", False, "the embedded broker did not start " * 3, 5, 0, 0, 0, 0, 0, 0
            ),
        ],
        devices=[DeviceRow("demo-tcp-1", {"temperature": 21.5, "humidity": 45.0}, 0.3)],
        commands=[long_reply],
        notes=["error " + "z" * 100],
    )


def test_every_view_fits_80_columns() -> None:
    for phase in ("running", "done"):
        frame = render_frame(_snapshot(phase))
        assert all(len(line) <= 79 for line in frame)
    assert len(render_status_line(_snapshot())) <= 79
    assert "Ctrl+C" in render_frame(_snapshot("running"))[0]
    summary = {
        "duration_s": 20.5,
        "interrupted": True,
        "mode": "embedded (local queue in /tmp/x, in-hub worker)",
        "transports": {
            "tcp": {
                "available": True,
                "devices": 5,
                "connected": 5,
                "sent": 10,
                "acknowledged": 10,
                "stored": 9,
                "refused": 0,
                "errors": 0,
            },
            "mqtt": {"available": False, "reason": "a long reason " * 10},
        },
        "commands": [long.to_dict() for long in _snapshot().commands],
        "last_values": {"demo-tcp-1": {"temperature": 21.5}},
        "ok": False,
        "problem": "tcp: 9 stored of 10 acknowledged",
        "data_dir": None,
    }
    text = render_summary(summary)
    assert all(len(line) <= 79 for line in text)
    assert "interrupted after 20.5 s" in text[1]
    assert any(line.startswith("result: NOT OK, tcp: 9 stored of 10") for line in text)
    assert any('"y' in line for line in text[1:]) and not any("..." in line for line in text)


def test_demo_starts_the_console_and_its_printed_login_works(tmp_path: Path) -> None:
    import httpx

    env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "firmware-sim")])
    demo = subprocess.Popen(
        [sys.executable, "-m", "hubapp.cli", "demo", "--duration", "60", "--devices", "1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert demo.stdout is not None
        found = None
        for line in demo.stdout:
            found = re.match(r"^console   (http://\S+)  \(log in as (\S+) / (\S+)\)$", line)
            if found:
                break
        assert found is not None, "the demo printed no console line"
        url, user, password = found.groups()
        with httpx.Client(base_url=url, timeout=30, follow_redirects=True) as browser:
            form = browser.get("/login").text
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', form)
            assert csrf is not None
            page = browser.post(
                "/login",
                data={"username": user, "password": password, "csrf_token": csrf.group(1)},
            )
            assert page.status_code == 200 and "<h1>Devices</h1>" in page.text
            assert "demo-tcp-1" in page.text
    finally:
        demo.send_signal(signal.SIGINT)
        demo.communicate(timeout=90)
