"""Readable tables of benchmark results (the JSON line carries the same numbers).

Layer: benchmarks; may import anything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(hub: float | None, base: float | None) -> str:
    if not hub or not base:
        return "-"
    return f"{hub / base:.1f}x"


def _row(label: str, hub: str, base: str, ratio: str = "") -> str:
    return f"  {label:<30} {hub:>14} {base:>14} {ratio:>12}"


def _config_line(result: dict[str, Any]) -> str:
    cfg = result["config"]
    what = (
        f"{cfg['messages']} messages/device"
        if cfg.get("messages") is not None
        else f"{cfg['duration_s']:g} s"
    )
    rate = f", {cfg['rate']:g} msg/s/device" if cfg.get("rate") else ", unpaced"
    qos = f", QoS {cfg['qos']}" if result["transport"] == "mqtt" else ""
    return (
        f"ingest over {result['transport']}: {cfg['devices']} devices, {what}{rate}{qos}, "
        f"window {cfg['window']}; 1 worker process, pool {cfg['worker_pool']}, concurrency "
        f"{cfg['worker_concurrency']}; loop {cfg['loop']}; {result['machine']['cpus']} CPUs"
    )


def ingest_table(result: dict[str, Any]) -> str:
    """The hub and the baseline side by side, with the ratio hub/baseline."""
    hub: dict[str, Any] = result.get("hub") or {}
    base: dict[str, Any] = result.get("baseline") or {}

    def get(system: dict[str, Any], *path: str) -> Any:
        value: Any = system
        for key in path:
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value

    def line(
        label: str,
        *path: str,
        digits: int = 0,
        ratio: bool = False,
        fmt: Callable[[Any], str] | None = None,
    ) -> str:
        h, b = get(hub, *path), get(base, *path)
        show = fmt or (lambda v: _num(v, digits))
        return _row(
            label,
            show(h) if hub else "",
            show(b) if base else "",
            _ratio(h, b) if ratio else "",
        )

    def stored_text(system: dict[str, Any]) -> Any:
        if not system:
            return None
        mark = "all" if system["all_stored"] else "NOT all"
        return f"{system['stored']:,} ({mark})"

    out = [_config_line(result), "", _row("", "hub", "baseline", "hub/baseline")]
    out.append(line("acknowledged to devices msg/s", "acked_per_s", ratio=True))
    out.append(line("stored by workers msg/s", "stored_per_s", ratio=True))
    out.append(line("messages sent", "sent"))
    out.append(_row("messages stored", stored_text(hub) or "", stored_text(base) or ""))
    out.append(line("latency device->stored p50 ms", "latency_ms", "p50", digits=1))
    out.append(line("latency device->stored p99 ms", "latency_ms", "p99", digits=1))
    out.append(line("last row stored after (s)", "stored_span_s", digits=1))
    out.append(line("CPU s: server", "cpu_s", "server", digits=1))
    out.append(line("CPU s: worker", "cpu_s", "worker", digits=1))
    out.append(line("CPU s: fleet (simulator)", "cpu_s", "fleet", digits=1))
    out.append(line("CPU s: rabbitmq (whole server)", "cpu_s", "rabbitmq", digits=1))
    out.append(line("CPU s: other processes", "cpu_s", "others", digits=1))
    out.append(line("CPU us/message: server", "cpu_us_per_message", "server", digits=1))
    out.append(line("CPU us/message: worker", "cpu_us_per_message", "worker", digits=1))
    out.append(line("server RSS MB (peak)", "server_rss_mb", "peak", digits=1))
    if get(hub, "dispatch", "mean_batch_size") is not None:
        out.append(line("mean batch (messages/task)", "dispatch", "mean_batch_size", digits=1))
    targets = result.get("targets")
    if targets:
        out.append("")
        stored = hub.get("stored_per_s", 0.0)
        met = "met" if targets["stored_per_s_met"] else "NOT met"
        out.append(f"  target: stored >= {targets['stored_per_s']:,} msg/s: {_num(stored)} ({met})")
        if targets.get("ratio_met") is not None:
            met = "met" if targets["ratio_met"] else "NOT met"
            out.append(
                f"  target: >= {targets['ratio']:g}x the baseline (stored msg/s): "
                f"{result['ratio']['stored_per_s']:.1f}x ({met})"
            )
    return "\n".join(out)


def sweep_table(runs: list[dict[str, Any]]) -> str:
    """One line per fleet size: stored msg/s of the hub and of the baseline."""
    header = (
        f"  {'devices':>8} {'hub acked/s':>12} {'hub stored/s':>13} {'hub p99 ms':>11} "
        f"{'base stored/s':>14} {'ratio':>7}"
    )
    out = [header]
    for run in runs:
        hub, base = run.get("hub") or {}, run.get("baseline") or {}
        out.append(
            f"  {run['config']['devices']:>8} {_num(hub.get('acked_per_s')):>12} "
            f"{_num(hub.get('stored_per_s')):>13} "
            f"{_num((hub.get('latency_ms') or {}).get('p99'), 1):>11} "
            f"{_num(base.get('stored_per_s')):>14} "
            f"{_ratio(hub.get('stored_per_s'), base.get('stored_per_s')):>7}"
        )
    return "\n".join(out)


def connections_table(result: dict[str, Any]) -> str:
    out = [
        f"connections: idle authenticated devices held by one hub process "
        f"({result['machine']['cpus']} CPUs)",
        "",
        f"  {'transport':<10} {'devices':>8} {'connected':>10} {'held':>8} {'connect s':>10} "
        f"{'hub RSS MB':>11} {'KB/conn':>8} {'hub CPU s':>10}",
    ]
    for name in ("tcp", "mqtt"):
        r = result.get(name)
        if not r:
            continue
        out.append(
            f"  {name:<10} {r['devices']:>8} {r['connected']:>10} {_num(r['held_by_hub']):>8} "
            f"{_num(r['connect_s'], 2):>10} {_num(r['hub_rss_mb']['connected'], 1):>11} "
            f"{_num(r['rss_kb_per_connection'], 2):>8} {_num(r['hub_cpu_s'], 1):>10}"
        )
    for target in result.get("targets", []):
        out.append(f"  target: {target['text']}: {target['measured']} "
                   f"({'met' if target['met'] else 'NOT met'})")  # fmt: skip
    return "\n".join(out)
