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
    ratio = hub / base
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.1f}x"


def _row(label: str, hub: str, base: str, ratio: str = "") -> str:
    return f"  {label:<38} {hub:>16} {base:>16} {ratio:>18}".rstrip()


def _loop_line(result: dict[str, Any]) -> str:
    asked = result["config"].get("loop", "auto")
    ran = (result.get("hub") or {}).get("event_loop")
    if ran is None:
        return f"hub event loop: setting {asked} (the hub did not report the loop it runs on)"
    return f"hub event loop: {ran} (setting event_loop = {asked})"


def _config_line(result: dict[str, Any]) -> str:
    cfg = result["config"]
    what = (
        f"{cfg['messages']} messages/device"
        if cfg.get("messages") is not None
        else f"{cfg['duration_s']:g} s"
    )
    rate = f", {cfg['rate']:g} msg/s/device" if cfg.get("rate") else ", unpaced"
    mqtt = result["transport"] == "mqtt"
    qos = f", QoS {cfg['qos']}" if mqtt else ""
    fleet = ""
    if mqtt:
        fleet = "; lean publishers" if cfg.get("lean", True) else "; paho devices (subscribed)"
    return (
        f"ingest over {result['transport']}: {cfg['devices']} devices, {what}{rate}{qos}, "
        f"window {cfg['window']}{fleet}; 1 worker process, pool {cfg['worker_pool']}, "
        f"concurrency {cfg['worker_concurrency']}; {result['machine']['cpus']} CPUs"
    )


def ingest_table(result: dict[str, Any]) -> str:
    """The hub and the baseline (or RabbitMQ's MQTT plugin) side by side, with the ratio.

    CPU per message comes first: on a shared machine it moves far less than the
    rates. Every rate carries the seconds it was measured over.
    """
    hub: dict[str, Any] = result.get("hub") or {}
    other_name = "rabbitmq-mqtt" if "rabbitmq-mqtt" in result else "baseline"
    base: dict[str, Any] = result.get(other_name) or {}

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
        fmt: Callable[[dict[str, Any], Any], str] | None = None,
    ) -> str:
        h, b = get(hub, *path), get(base, *path)

        def show(system: dict[str, Any], value: Any) -> str:
            if not system:
                return ""
            return fmt(system, value) if fmt else _num(value, digits)

        return _row(label, show(hub, h), show(base, b), _ratio(h, b) if ratio else "")

    def over(span_key: str) -> Callable[[dict[str, Any], Any], str]:
        def show(system: dict[str, Any], value: Any) -> str:
            span = system.get(span_key)
            return _num(value) + (f" ({span:.1f} s)" if span is not None else "")

        return show

    def stored_text(system: dict[str, Any]) -> Any:
        if not system:
            return None
        mark = "all" if system["all_stored"] else "NOT all"
        return f"{system['stored']:,} ({mark})"

    server_label = "CPU us/message: server" + (
        " / RabbitMQ node" if other_name == "rabbitmq-mqtt" else ""
    )
    out = [
        _config_line(result),
        _loop_line(result),
        "",
        _row("", "hub", other_name, f"hub/{other_name}"),
        line(server_label, "cpu_us_per_message", "server",
             digits=1),
        line("CPU us/message: worker", "cpu_us_per_message", "worker", digits=1),
        line("CPU us/message: load generator", "cpu_us_per_message", "fleet", digits=1),
        line("fleet run s (connect to last ack)", "fleet_duration_s", digits=1),
        line("acknowledged msg/s (over run)", "acked_per_s", ratio=True,
             fmt=over("fleet_duration_s")),
        line("stored msg/s (start to last stored)", "stored_per_s", ratio=True,
             fmt=over("stored_span_s")),
        line("messages sent", "sent"),
        _row("messages stored", stored_text(hub) or "", stored_text(base) or ""),
        line("latency device->stored p50 ms", "latency_ms", "p50", digits=1),
        line("latency device->stored p99 ms", "latency_ms", "p99", digits=1),
        line("CPU s: server", "cpu_s", "server", digits=1),
        line("CPU s: worker", "cpu_s", "worker", digits=1),
        line("CPU s: fleet (load generator)", "cpu_s", "fleet", digits=1),
        line("CPU s: rabbitmq (shared server)", "cpu_s", "rabbitmq", digits=1),
        line("CPU s: other processes", "cpu_s", "others", digits=1),
        line("server RSS MB (peak)", "server_rss_mb", "peak", digits=1),
        line("server write syscalls/message", "server_write_syscalls_per_message", digits=3),
    ]  # fmt: skip
    if get(hub, "dispatch", "mean_batch_size") is not None:
        out.append(line("mean batch (messages/task)", "dispatch", "mean_batch_size", digits=1))
    if other_name == "rabbitmq-mqtt" and base:
        out.append("")
        out.append(
            "  rabbitmq-mqtt: stored = in a durable queue bound to amq.topic (no worker, no "
            "database); PUBACK after the queue has it"
        )
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
        if targets.get("rabbitmq_mqtt_met") is not None:
            met = "met" if targets["rabbitmq_mqtt_met"] else "NOT met"
            out.append(
                "  target: >= 1x RabbitMQ's MQTT plugin (stored msg/s): "
                f"{result['ratio_to_rabbitmq_mqtt']['stored_per_s']:.2f}x ({met})"
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
    loops = sorted({str(r.get("event_loop")) for n in ("tcp", "mqtt") if (r := result.get(n))})
    out = [
        f"connections: idle authenticated devices held by one hub process "
        f"({result['machine']['cpus']} CPUs; hub event loop: {', '.join(loops) or '-'})",
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
        if r.get("errors"):
            out.append(f"  {name}: {r['errors']} connect errors, {r.get('refused') or 0} refused")
        probe = r.get("publish_probe")
        if probe and "idle" in probe and "held" in probe:
            idle, held = probe["idle"]["msg_per_s"], probe["held"]["msg_per_s"]
            out.append(
                f"  {name} publish probe (QoS 1, {probe['idle']['seconds']:g} s each): "
                f"{idle:,.0f} msg/s idle hub, {held:,.0f} msg/s with {r['devices']} held "
                f"({held / idle if idle else 0:.2f}x)"
            )
            if probe["held"].get("hub_cpu_us_per_msg") is not None:
                out.append(
                    f"  {name} publish probe: hub CPU {probe['idle']['hub_cpu_us_per_msg']} "
                    f"us/msg idle, {probe['held']['hub_cpu_us_per_msg']} us/msg held; the held "
                    f"fleet's own process used {probe['held']['held_fleet_cpu_s']} CPU s "
                    "meanwhile"
                )
        again = r.get("restart")
        if again:
            back = again["all_back_s"]
            out.append(
                f"  {name} hub restarted with the fleet up: "
                + (
                    f"all {r['devices']} back {back:.1f} s after the stop "
                    f"({again['all_back_after_start_s']:.1f} s after the new hub started, "
                    f"which took {again['hub_down_s']:.1f} s)"
                    if back is not None
                    else f"only {again['held_by_hub']} of {r['devices']} back"
                )
                + f", {again['connect_errors']} connect errors, "
                f"hub RSS peak {again['hub_rss_peak_mb']:.0f} MB, CPU {again['hub_cpu_s']:.1f} s"
            )
    for target in result.get("targets", []):
        out.append(f"  target: {target['text']}: {target['measured']} "
                   f"({'met' if target['met'] else 'NOT met'})")  # fmt: skip
    return "\n".join(out)
