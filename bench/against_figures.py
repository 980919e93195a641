"""The pure parts of `python -m bench against`: one run's figures, medians, ratios, table.

Layer: benchmarks; may import anything (imports only the standard library and
bench.services' error, so that it is unit-tested without git or services).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.services import BenchError

SIDES = ("rev", "current")
# Options `against` sets itself for every run, or that do not make one run.
RESERVED_INGEST_OPTIONS = (
    "--transport",
    "--no-baseline",
    "--baseline-only",
    "--json",
    "--out",
    "--sweep",
    "--plot",
    "--quiet",
    "-q",
)


@dataclass(frozen=True)
class RunFigures:
    """The figures `against` keeps of one `bench ingest` run (the hub's side)."""

    transport: str
    side: str
    round: int
    stored_per_s: float
    acked_per_s: float | None
    all_stored: bool
    cpu_us_per_message: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "transport": self.transport,
            "side": self.side,
            "round": self.round,
            "stored_per_s": self.stored_per_s,
            "acked_per_s": self.acked_per_s,
            "all_stored": self.all_stored,
            "cpu_us_per_message": self.cpu_us_per_message,
        }


def parse_ingest_output(stdout: str, *, transport: str, side: str, round_: int) -> RunFigures:
    """The figures of one run from the stdout of `bench ingest --json` (its last line)."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise BenchError(f"{side} {transport} round {round_}: `bench ingest` printed nothing")
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise BenchError(
            f"{side} {transport} round {round_}: the last line of `bench ingest` is not "
            f"JSON: {lines[-1][:200]!r}"
        ) from None
    hub = result.get("hub") if isinstance(result, dict) else None
    if not isinstance(hub, dict) or "stored_per_s" not in hub:
        raise BenchError(f"{side} {transport} round {round_}: no hub figures in the result")
    cpu = hub.get("cpu_us_per_message") or {}
    return RunFigures(
        transport=transport,
        side=side,
        round=round_,
        stored_per_s=float(hub["stored_per_s"]),
        acked_per_s=None if hub.get("acked_per_s") is None else float(hub["acked_per_s"]),
        all_stored=bool(hub.get("all_stored", False)),
        cpu_us_per_message={k: float(v) for k, v in cpu.items() if v is not None},
    )


def _side_summary(runs: Sequence[RunFigures]) -> dict[str, Any]:
    stored = [r.stored_per_s for r in runs]
    roles = list(dict.fromkeys(role for r in runs for role in r.cpu_us_per_message))
    cpu = {
        role: round(statistics.median(vals), 1)
        for role in roles
        if (vals := [r.cpu_us_per_message[role] for r in runs if role in r.cpu_us_per_message])
    }
    return {
        "runs": len(runs),
        "stored_per_s": stored,
        "median_stored_per_s": round(statistics.median(stored), 1) if stored else None,
        "min_stored_per_s": min(stored) if stored else None,
        "max_stored_per_s": max(stored) if stored else None,
        "median_cpu_us_per_message": cpu,
        "all_stored": all(r.all_stored for r in runs),
    }


def _ratio(current: float | None, rev: float | None) -> float | None:
    if not current or not rev:
        return None
    return round(current / rev, 3)


def summarise(runs: Sequence[RunFigures]) -> dict[str, dict[str, Any]]:
    """Per transport: each side's median, spread and CPU, and the ratios current/REV."""
    out: dict[str, dict[str, Any]] = {}
    for transport in dict.fromkeys(r.transport for r in runs):
        sides = {
            side: _side_summary([r for r in runs if r.transport == transport and r.side == side])
            for side in SIDES
        }
        rev, cur = sides["rev"], sides["current"]
        cpu_ratio = {
            role: _ratio(cur["median_cpu_us_per_message"].get(role), value)
            for role, value in rev["median_cpu_us_per_message"].items()
        }
        out[transport] = {
            **sides,
            "ratio": {
                "stored_per_s": _ratio(cur["median_stored_per_s"], rev["median_stored_per_s"]),
                "cpu_us_per_message": cpu_ratio,
            },
        }
    return out


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _spread(side: dict[str, Any]) -> str:
    if side["min_stored_per_s"] is None:
        return "-"
    return f"{_num(side['min_stored_per_s'])}-{_num(side['max_stored_per_s'])}"


def against_table(summary: dict[str, dict[str, Any]], rev_label: str, current_label: str) -> str:
    """One table per transport: medians of REV and of this tree, the ratio and the spread."""

    def row(label: str, rev: str, cur: str, ratio: str) -> str:
        return f"  {label:<32} {rev:>16} {cur:>16} {ratio:>14}".rstrip()

    out: list[str] = []
    for transport, figures in summary.items():
        rev, cur, ratio = figures["rev"], figures["current"], figures["ratio"]
        if out:
            out.append("")
        out.append(
            f"ingest over {transport} (hub only), REV = {rev_label}, current = "
            f"{current_label}: {rev['runs']} + {cur['runs']} runs, alternating"
        )
        out.append("")
        out.append(row("", "REV", "current", "current/REV"))
        out.append(
            row(
                "stored msg/s (median)",
                _num(rev["median_stored_per_s"]),
                _num(cur["median_stored_per_s"]),
                _times(ratio["stored_per_s"]),
            )
        )
        out.append(row("stored msg/s (min-max)", _spread(rev), _spread(cur), ""))
        for role, value in rev["median_cpu_us_per_message"].items():
            out.append(
                row(
                    f"CPU us/message: {role} (median)",
                    _num(value, 1),
                    _num(cur["median_cpu_us_per_message"].get(role), 1),
                    _times(ratio["cpu_us_per_message"].get(role)),
                )
            )
        for side, name in ((rev, rev_label), (cur, current_label)):
            if not side["all_stored"]:
                out.append(f"  warning: a run of {name} did not store every message sent")
    return "\n".join(out)


def check_ingest_options(options: Sequence[str]) -> None:
    """Refuse the ingest options that `against` sets itself or that break one-run output."""
    for option in options:
        name = option.split("=", 1)[0]
        if name in RESERVED_INGEST_OPTIONS:
            raise BenchError(
                f"`bench against` sets or forbids the ingest option {name}; use "
                "`bench against --transport` and `--json`/`--out` of `bench against` instead"
            )
