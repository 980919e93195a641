"""The throughput plot of an ingest sweep (PNG), made with matplotlib when it is installed.

Layer: benchmarks; may import anything.

matplotlib is optional (the `bench` extra): without it, `--plot` stops before
anything runs, with a message saying how to install it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.services import BenchError

_INSTALL = (
    "--plot needs matplotlib, which is optional: pip install 'mqtt-hardware-hub[bench]' "
    "(or pip install matplotlib)"
)


def require_matplotlib() -> None:
    """BenchError with install instructions when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise BenchError(_INSTALL) from None


def plot_sweep(result: dict[str, Any], path: Path) -> None:
    """Messages per second (acknowledged and stored) against devices, hub and baseline."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    devices = [r["config"]["devices"] for r in runs]

    def series(system: str, key: str) -> list[float]:
        return [(r.get(system) or {}).get(key, float("nan")) for r in runs]

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    ax.plot(devices, series("hub", "stored_per_s"), "o-", color="#1f77b4",
            label="hub: stored by workers")  # fmt: skip
    ax.plot(devices, series("hub", "acked_per_s"), "o--", color="#1f77b4", alpha=0.6,
            label="hub: acknowledged to devices")  # fmt: skip
    if any(r.get("baseline") for r in runs):
        ax.plot(devices, series("baseline", "stored_per_s"), "s-", color="#d62728",
                label="baseline: stored by workers")  # fmt: skip
        ax.plot(devices, series("baseline", "acked_per_s"), "s--", color="#d62728", alpha=0.6,
                label="baseline: acknowledged to devices")  # fmt: skip
    for devices_n, run in zip(devices, runs, strict=True):
        hub, base = run.get("hub") or {}, run.get("baseline") or {}
        if hub.get("stored_per_s") and base.get("stored_per_s"):
            ax.annotate(
                f"{hub['stored_per_s'] / base['stored_per_s']:.0f}x",
                (devices_n, hub["stored_per_s"]),
                textcoords="offset points",
                xytext=(0, -14),
                ha="center",
                fontsize=8,
                color="#1f77b4",
            )
    first = runs[0]
    cfg = first["config"]
    duration = f"{cfg['duration_s']:g} s" if cfg.get("duration_s") else f"{cfg['messages']} msg"
    ax.set_title(
        f"Ingest over {result['transport'].upper()}, {duration} per run, "
        f"{first['machine']['cpus']} CPUs\none worker process per system "
        f"({cfg['worker_pool']}, concurrency {cfg['worker_concurrency']}); "
        "labels: hub/baseline stored msg/s",
        fontsize=10,
    )
    ax.set_xlabel("devices")
    ax.set_ylabel("messages per second")
    ax.set_xscale("log")
    ax.set_xticks(devices)
    ax.set_xticklabels([str(d) for d in devices])
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
