"""`python -m bench against REV`: the ingest benchmark of REV and of this tree, side by side.

Layer: benchmarks; may import anything.

A claim such as "no slowdown" is a ratio measured in one run on one machine
under one load, not two figures taken on different days. This command checks
REV out into a temporary git worktree (`git worktree add --detach`, removed
afterwards, also on Ctrl+C or failure) and runs `python -m bench ingest
--no-baseline --json` alternately from REV's tree and from this tree (REV,
current, REV, current, ... for --rounds rounds per transport), so that drift
in the machine's load falls on both sides alike.

Each run is a subprocess of the same interpreter with its working directory
and PYTHONPATH (`<tree>:<tree>/firmware-sim`, nothing inherited) set to one
tree. PYTHONPATH comes before site-packages on `sys.path`, so it wins over the
editable install of this tree; and `bench ingest` gives every process it
starts a PYTHONPATH built from where its own `bench` package was imported
(bench/services.py `child_env`), so the hub, the worker and the fleet follow
the same tree. Before measuring, one dry subprocess per side prints where
`bench`, `hub`, `bridges`, `tasks` and `firmware_sim` come from; a module
imported from outside its tree stops the run (the paths are in the JSON).

The pure parts (reading a run's JSON line, medians, ratios, the table) are
the functions at the top; the git and subprocess parts are below them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.services import ROOT, BenchError, log

SIDES = ("rev", "current")
CHECKED_MODULES = ("bench", "hub", "bridges", "tasks", "firmware_sim")
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


# ---------------------------------------------------------------------------
# Pure parts: results, medians, table
# ---------------------------------------------------------------------------


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
    roles = sorted({role for r in runs for role in r.cpu_us_per_message})
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
        return f"  {label:<32} {rev:>16} {cur:>16} {ratio:>14}"

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


# ---------------------------------------------------------------------------
# Git and subprocesses
# ---------------------------------------------------------------------------


def _git(*args: str, cwd: Path = ROOT) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=120
    )
    if done.returncode != 0:
        raise BenchError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


@contextlib.contextmanager
def revision_tree(rev: str) -> Iterator[tuple[Path, str]]:
    """REV checked out in a temporary detached worktree; yields (tree, commit); removed after."""
    commit = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    folder = Path(tempfile.mkdtemp(prefix="bench-against-"))
    tree = folder / "tree"
    try:
        _git("worktree", "add", "--detach", str(tree), commit)
        yield tree, commit
    finally:
        # Cleanup must finish even when a second Ctrl+C arrives meanwhile.
        with _signals_ignored():
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(tree)],
                cwd=ROOT, capture_output=True, check=False, timeout=120,
            )  # fmt: skip
            subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True, check=False)
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def tree_env(tree: Path) -> dict[str, str]:
    """Our environment with PYTHONPATH set to `tree` only, so every import comes from it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tree), str(tree / "firmware-sim")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


_IMPORT_PROBE = (
    "import importlib, json, sys\n"
    "print(json.dumps({m: importlib.import_module(m).__file__ for m in sys.argv[1:]}))\n"
)


def check_imports(tree: Path) -> dict[str, str]:
    """Where a subprocess started like the runs imports our packages from; BenchError if
    any comes from outside `tree`."""
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_PROBE, *CHECKED_MODULES],
        cwd=tree, env=tree_env(tree), capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    if done.returncode != 0:
        raise BenchError(f"importing from {tree} failed: {done.stderr.strip()[-2000:]}")
    files: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    root = tree.resolve()
    for module, path in files.items():
        if not Path(path).resolve().is_relative_to(root):
            raise BenchError(f"a run from {tree} imports {module} from {path}, not from that tree")
    return files


def run_ingest_in(tree: Path, transport: str, options: Sequence[str], stderr_file: Path) -> str:
    """One `bench ingest --no-baseline --json` run from `tree`; returns its stdout."""
    command = [
        sys.executable, "-m", "bench", "ingest", "--transport", transport,
        "--no-baseline", "--json", "--quiet", *options,
    ]  # fmt: skip
    with stderr_file.open("w", encoding="utf-8") as err:
        proc = subprocess.Popen(
            command, cwd=tree, env=tree_env(tree), stdout=subprocess.PIPE, stderr=err, text=True
        )
        try:
            stdout, _ = proc.communicate()
        except BaseException:
            # The run cleans up after itself on SIGTERM (vhost, hub, worker); let it.
            with _signals_ignored():
                proc.terminate()
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            raise
    if proc.returncode != 0:
        tail = stderr_file.read_text("utf-8", errors="replace").strip()[-3000:]
        raise BenchError(f"`bench ingest` from {tree} exited with {proc.returncode}:\n{tail}")
    return stdout


@dataclass(frozen=True)
class AgainstConfig:
    rev: str
    rounds: int = 3
    transports: tuple[str, ...] = ("tcp",)
    ingest_options: tuple[str, ...] = ()
    quiet: bool = False


def run_against(cfg: AgainstConfig) -> dict[str, Any]:
    """Measure REV and this tree alternately; the JSON result (see the module docstring)."""
    check_ingest_options(cfg.ingest_options)
    current_commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    runs: list[RunFigures] = []
    with revision_tree(cfg.rev) as (rev_tree, rev_commit):
        trees = {"rev": rev_tree, "current": ROOT}
        imports = {side: check_imports(tree) for side, tree in trees.items()}
        if not cfg.quiet:
            for side, files in imports.items():
                log(f"{side} imports hub from {files['hub']}")
        total = cfg.rounds * len(cfg.transports) * len(SIDES)
        done = 0
        with tempfile.TemporaryDirectory(prefix="bench-against-logs-") as logs:
            for transport in cfg.transports:
                for round_ in range(1, cfg.rounds + 1):
                    for side in SIDES:
                        done += 1
                        label = f"run {done}/{total}: {transport} round {round_} {side}"
                        if not cfg.quiet:
                            log(f"{label} ...")
                        stdout = run_ingest_in(
                            trees[side],
                            transport,
                            cfg.ingest_options,
                            Path(logs) / f"{transport}-{round_}-{side}.log",
                        )
                        figures = parse_ingest_output(
                            stdout, transport=transport, side=side, round_=round_
                        )
                        runs.append(figures)
                        if not cfg.quiet:
                            cpu = figures.cpu_us_per_message.get("server")
                            log(
                                f"{label}: stored {figures.stored_per_s:,.0f} msg/s"
                                + (f", server {cpu:.1f} us/message" if cpu is not None else "")
                                + ("" if figures.all_stored else " (NOT all stored)")
                            )
    return {
        "benchmark": "against",
        "rev": cfg.rev,
        "rev_commit": rev_commit,
        "current_commit": current_commit,
        "current_dirty": dirty,
        "rounds": cfg.rounds,
        "ingest_options": list(cfg.ingest_options),
        "imports": imports,
        "summary": summarise(runs),
        "runs": [r.as_json() for r in runs],
    }


def result_table(result: dict[str, Any]) -> str:
    rev_label = f"{result['rev']} ({result['rev_commit'][:9]})"
    if result["rev"][:9] == result["rev_commit"][:9]:
        rev_label = result["rev_commit"][:9]
    current = result["current_commit"][:9] + ("+dirty" if result["current_dirty"] else "")
    return against_table(result["summary"], rev_label, current)
