"""HAProxy in front of two hubs, as docs/haproxy.cfg configures it, on free ports.

Layer: benchmarks; may import anything.

`start_haproxy(folder, hubs)` runs Debian's `haproxy -db -f docs/haproxy.cfg`
in the foreground as a benchmark child: the file as shipped, only its
addresses and ports given by its environment variables (`HAPROXY_*`,
`HUB1_*`, `HUB2_*`), so that what is measured is the documented setup.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.services import LOCALHOST, ROOT, BenchError, Child, child_env, free_port, port_open

HAPROXY_CONFIG = ROOT / "docs" / "haproxy.cfg"
#: docs/haproxy.cfg names two hubs (`hub1`, `hub2`).
HUBS_IN_CONFIG = 2


@dataclass
class Haproxy:
    child: Child
    tcp_port: int
    mqtt_port: int


def haproxy_env(hubs: Sequence[Mapping[str, int]], tcp_port: int, mqtt_port: int) -> dict[str, str]:
    """The variables docs/haproxy.cfg reads: its listening ports and each hub's
    `tcp`, `mqtt` and `http` (status, health-checked) ports."""
    if len(hubs) != HUBS_IN_CONFIG:
        raise BenchError(f"docs/haproxy.cfg has {HUBS_IN_CONFIG} hubs, not {len(hubs)}")
    env = {
        "HAPROXY_BIND": LOCALHOST,
        "HAPROXY_TCP_PORT": str(tcp_port),
        "HAPROXY_MQTT_PORT": str(mqtt_port),
    }
    for n, ports in enumerate(hubs, start=1):
        env[f"HUB{n}_ADDR"] = LOCALHOST
        # A hub started without MQTT has no MQTT port: that backend then points
        # at the TCP port and is never used.
        env[f"HUB{n}_TCP_PORT"] = str(ports["tcp"])
        env[f"HUB{n}_MQTT_PORT"] = str(ports.get("mqtt", ports["tcp"]))
        env[f"HUB{n}_HTTP_PORT"] = str(ports["http"])
    return env


def start_haproxy(folder: Path, hubs: Sequence[Mapping[str, int]]) -> Haproxy:
    """HAProxy on free ports of 127.0.0.1 in front of `hubs` (ports by listener name),
    returned once it accepts connections and has health-checked the hubs."""
    binary = shutil.which("haproxy")
    if binary is None:
        raise BenchError(
            "the two-hub run needs the haproxy binary (Debian: apt-get install haproxy)"
        )
    tcp_port, mqtt_port = free_port(), free_port()
    env = child_env(haproxy_env(hubs, tcp_port, mqtt_port))
    check = subprocess.run(
        [binary, "-c", "-q", "-f", str(HAPROXY_CONFIG)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if check.returncode != 0:
        raise BenchError(f"haproxy rejects docs/haproxy.cfg: {check.stderr.strip()}")
    child = Child(
        "haproxy",
        [binary, "-db", "-f", str(HAPROXY_CONFIG)],
        env=env,
        log_path=folder / "haproxy.log",
        # In the run's folder, so that a process left behind would be found by it.
        cwd=folder,
    )
    try:
        deadline = time.monotonic() + 20
        while not port_open(LOCALHOST, tcp_port):
            child.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"haproxy did not listen within 20 s:\n{child.log_tail()}")
            time.sleep(0.1)
        # Two checks of each hub's /readyz (inter 1s, rise 2) before the fleet
        # comes, so that both hubs are in the health-checked backend.
        time.sleep(2.5)
        child.check_alive()
    except BaseException:
        child.stop()
        raise
    return Haproxy(child=child, tcp_port=tcp_port, mqtt_port=mqtt_port)
