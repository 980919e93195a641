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
in bench.against_figures; this module holds the git and subprocess parts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.against_figures import (
    SIDES,
    RunFigures,
    against_table,
    check_ingest_options,
    parse_ingest_output,
    summarise,
)
from bench.services import ROOT, BenchError, log

CHECKED_MODULES = ("bench", "hub", "bridges", "tasks", "firmware_sim")

_AGAINST_EPILOG = """\
examples:
  python -m bench against main
  python -m bench against HEAD~5 --rounds 5 --transport tcp,mqtt -- --devices 50 --duration 20
  python -m bench against HEAD~1 --json --out against.json -- --duration 10

REV is checked out into a temporary git worktree (removed afterwards, also on
Ctrl+C). For each transport, `python -m bench ingest --no-baseline --json` runs
--rounds times from REV's tree and as often from this tree, alternating (REV,
current, REV, current, ...), each as a subprocess of this interpreter with its
working directory and PYTHONPATH set to that tree, so that it and every process
it starts import that tree's code (checked once per side before measuring).
Options after `--` go to every `bench ingest` run (not --transport, --json,
--out, --sweep, --plot, --quiet, --no-baseline or --baseline-only). The table
shows per transport the median stored msg/s of REV and of this tree, the ratio
current/REV, the spread (min-max) and the median CPU us/message. REV runs with
this interpreter and its installed dependencies. See docs/benchmarks.md.
"""


def _transports(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names or any(n not in ("tcp", "mqtt") for n in names):
        raise argparse.ArgumentTypeError("a comma-separated list of tcp, mqtt")
    return list(dict.fromkeys(names))


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
    try:
        commit = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except BenchError:
        raise BenchError(f"{rev!r} is not a commit of this repository ({ROOT})") from None
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


def add_against_parser(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], positive_int: Callable[[str], int]
) -> None:
    """The `against` subcommand of `python -m bench` (`sub`: its subparsers)."""
    against = sub.add_parser(
        "against",
        help="the ingest benchmark of an earlier git revision and of this tree, alternating",
        description="Hub-only ingest throughput of REV and of this tree, measured side by\n"
        "side in one run: medians, the ratio current/REV and the spread per transport.",
        usage="python -m bench against REV [--rounds N] [--transport tcp,mqtt] [--json] "
        "[--out FILE] [-- INGEST_OPTIONS ...]",
        epilog=_AGAINST_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    against.add_argument(
        "rev", metavar="REV", help="git revision to compare with (e.g. main, HEAD~3)"
    )
    against.add_argument(
        "--rounds",
        type=positive_int,
        default=3,
        help="runs of each side per transport (default: 3)",
    )
    against.add_argument(
        "--transport",
        type=_transports,
        default=["tcp"],
        metavar="tcp,mqtt",
        help="device transports, comma-separated (default: tcp)",
    )
    against.add_argument("--out", metavar="FILE", help="also write the JSON result to FILE")
    against.add_argument(
        "--json", action="store_true", help="stdout: only the JSON line (the table goes to stderr)"
    )
    against.add_argument("--quiet", "-q", action="store_true", help="no progress on stderr")


def against_command(
    args: argparse.Namespace,
    ingest_options: list[str],
    emit: Callable[[Any, str, argparse.Namespace], None],
    build_parser: Callable[[], argparse.ArgumentParser],
) -> None:
    """Run `python -m bench against` with its parsed arguments and the options after `--`."""
    check_ingest_options(ingest_options)
    # Refuse a mistyped ingest option now rather than after the first runs.
    build_parser().parse_args(["ingest", *ingest_options])
    result = run_against(
        AgainstConfig(
            rev=args.rev,
            rounds=args.rounds,
            transports=tuple(args.transport),
            ingest_options=tuple(ingest_options),
            quiet=args.quiet,
        )
    )
    emit(result, result_table(result), args)
