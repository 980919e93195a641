"""`python -m bench ingest --fleet 10,100,1000`: throughput against fleet size, three systems.

Layer: benchmarks; may import anything.

For each fleet size, one ingest run over TCP (hub only), and one over MQTT
with `--against rabbitmq-mqtt` (the hub, then RabbitMQ's MQTT plugin on a
private node, with the same fleet). The other options (duration, rate,
window, QoS, worker) are those of the command line and the same for every
run. The result has every run's figures; `--plot` draws stored msg/s of the
three systems against the number of devices (docs/img/fleet.png in
docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.ingest import IngestConfig, run_ingest
from bench.services import log

#: (label, transport, system key in the run's result)
SERIES = (
    ("hub, TCP", "tcp", "hub"),
    ("hub, MQTT", "mqtt", "hub"),
    ("RabbitMQ MQTT plugin", "mqtt", "rabbitmq-mqtt"),
)


def run_fleet_sweep(base: IngestConfig, counts: Sequence[int]) -> dict[str, Any]:
    """Every fleet size in `counts`: a TCP hub run, then an MQTT run against the plugin."""
    runs: list[dict[str, Any]] = []
    for devices in counts:
        for transport in ("tcp", "mqtt"):
            if not base.quiet:
                log(f"fleet sweep: {devices} devices over {transport}")
            cfg = dataclasses.replace(
                base,
                transport=transport,
                devices=devices,
                baseline=False,
                systems=["hub"],
                against="rabbitmq-mqtt" if transport == "mqtt" else None,
            )
            runs.append(run_ingest(cfg))
    return {"benchmark": "ingest-fleet", "counts": list(counts), "runs": runs}


def _point(result: dict[str, Any], devices: int, transport: str, system: str) -> dict[str, Any]:
    for run in result["runs"]:
        if run["transport"] == transport and run["config"]["devices"] == devices:
            found: dict[str, Any] = run.get(system) or {}
            return found
    return {}


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def fleet_table(result: dict[str, Any]) -> str:
    """One line per fleet size and system: CPU per message, run length, stored msg/s."""
    out = [
        "throughput against fleet size (stored msg/s over the seconds in brackets; "
        "CPU us/message of the server / load generator)",
        "",
        f"  {'devices':>8}  {'system':<22} {'server us':>10} {'fleet us':>9} "
        f"{'stored msg/s':>20} {'acked msg/s':>20}",
    ]
    for devices in result["counts"]:
        for label, transport, system in SERIES:
            p = _point(result, devices, transport, system)
            if not p:
                continue
            cpu = p.get("cpu_us_per_message") or {}
            stored = f"{_num(p.get('stored_per_s'))} ({p.get('stored_span_s', 0):.1f} s)"
            acked = f"{_num(p.get('acked_per_s'))} ({p.get('fleet_duration_s', 0):.1f} s)"
            out.append(
                f"  {devices:>8}  {label:<22} {_num(cpu.get('server'), 1):>10} "
                f"{_num(cpu.get('fleet'), 1):>9} {stored:>20} {acked:>20}"
            )
    return "\n".join(out)


def plot_fleet(result: dict[str, Any], path: Path) -> None:
    """Stored msg/s against devices for the hub over TCP and MQTT and for the plugin."""
    from bench.plot import require_matplotlib

    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = result["counts"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    styles = {"hub, TCP": "o-", "hub, MQTT": "s-", "RabbitMQ MQTT plugin": "^--"}
    for label, transport, system in SERIES:
        values = [
            _point(result, n, transport, system).get("stored_per_s", float("nan")) for n in counts
        ]
        line = ax.plot(counts, values, styles[label], label=label)[0]
        for n, value in zip(counts, values, strict=True):
            if _point(result, n, transport, system).get("all_stored") is False:
                ax.annotate(
                    "not all stored", (n, value), textcoords="offset points", xytext=(4, 6),
                    fontsize=7, color=line.get_color(),
                )  # fmt: skip
    first = result["runs"][0]
    cfg = first["config"]
    length = f"{cfg['duration_s']:g} s" if cfg.get("duration_s") else f"{cfg['messages']} msg"
    qos = cfg["qos"]
    ax.set_title(
        f"Stored msg/s against fleet size, {length} of sending per run, MQTT QoS {qos}, "
        f"{first['machine']['cpus']} CPUs\nhub: stored by one worker in SQLite; "
        "plugin: in a durable queue (no worker)",
        fontsize=9,
    )
    ax.set_xlabel("devices")
    ax.set_ylabel("messages stored per second")
    ax.set_xscale("log")
    ax.set_xticks(counts)
    ax.set_xticklabels([str(n) for n in counts])
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
