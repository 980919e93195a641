"""`python -m fuzz TARGET|all (--runs N | --seconds S) [--keep]`: run fuzz targets.

Layer: tooling (see `fuzz/__init__.py`).

Each target runs in a child process (`fuzz.run`) on three corpus folders:
a fresh one for the inputs this run finds (libFuzzer writes to the first),
the kept corpus `fuzz/corpus/<target>/`, and seeds made now from the golden
vectors. `--keep` adds what the run found to the kept corpus
(only inputs that reached new code; every input is at most `--max-len` bytes).
A finding stops that target; its input is saved under `fuzz/findings/` and
the command exits 1. See docs/fuzzing.md.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ("native", "lines", "mqtt")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n")[0])
    parser.add_argument("target", choices=[*TARGETS, "all"])
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--runs", type=int, help="inputs to execute per target")
    budget.add_argument("--seconds", type=float, help="seconds per target")
    parser.add_argument("--keep", action="store_true", help="merge new inputs into the corpus")
    parser.add_argument("--max-len", type=int, default=4096, help="longest input, bytes")
    return parser.parse_args()


def _write_seeds(target: str, folder: Path) -> int:
    module = importlib.import_module(f"fuzz.{target}")
    count = 0
    for seed in module.seeds():
        (folder / hashlib.sha1(seed).hexdigest()).write_bytes(seed)
        count += 1
    return count


def _fuzz(target: str, args: argparse.Namespace, work: Path) -> tuple[bool, str]:
    new, seeds = work / "new", work / "seeds"
    new.mkdir()
    seeds.mkdir()
    kept = HERE / "corpus" / target
    kept.mkdir(parents=True, exist_ok=True)
    _write_seeds(target, seeds)
    findings = HERE / "findings"
    findings.mkdir(exist_ok=True)
    budget = f"-runs={args.runs}" if args.runs is not None else f"-max_total_time={args.seconds:g}"
    command = [
        sys.executable,
        "-m",
        "fuzz.run",
        target,
        budget,
        f"-max_len={args.max_len}",
        "-timeout=20",  # seconds for one input: a hang is a finding
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        f"-artifact_prefix={findings}/{target}-",
        str(new),
        str(kept),
        str(seeds),
    ]
    # Tokens of each format, so that mutations reach past the framing sooner.
    words = work / "words.dict"
    with words.open("wb") as out:
        for name in ("json.dict", f"{target}.dict") if target != "mqtt" else ("mqtt.dict",):
            out.write((HERE / "dicts" / name).read_bytes())
    command.insert(-3, f"-dict={words}")
    log = work / "log.txt"
    started = time.monotonic()
    with log.open("wb") as out:
        rc = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
    elapsed = time.monotonic() - started
    text = log.read_text(errors="replace")
    executed = re.findall(r"stat::number_of_executed_units: (\d+)", text)
    runs = int(executed[-1]) if executed else 0
    found = len(list(new.iterdir()))
    summary = (
        f"{target}: {runs:,} inputs in {elapsed:.0f} s, {found} new corpus inputs, "
        f"{'no findings' if rc == 0 else 'FINDING'}"
    )
    if rc != 0:
        tail = "\n".join(text.splitlines()[-40:])
        summary += f"\n{tail}"
    elif args.keep and found:
        # libFuzzer wrote only inputs that reached new code (given the kept corpus
        # and the seeds) to `new`: keep those. Its -merge=1 would re-execute
        # argv[0], which for a Python target is not a program.
        for path in new.iterdir():
            shutil.copyfile(path, kept / path.name)
        summary += f"; kept corpus now {len(list(kept.iterdir()))} inputs"
    return rc == 0, summary


def main() -> int:
    args = _arguments()
    targets = TARGETS if args.target == "all" else (args.target,)
    ok = True
    for target in targets:
        work = Path(tempfile.mkdtemp(prefix=f"fuzz-{target}-"))
        try:
            passed, summary = _fuzz(target, args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(summary, flush=True)
        ok = ok and passed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
