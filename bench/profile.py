"""Reading a py-spy profile of the hub: where its time goes, by function and by area.

Layer: benchmarks; may import anything.

`python -m bench ingest --profile FILE` samples the hub process with
`py-spy record --format raw` (collapsed stacks: `frame;frame;... count`, one
stack a line, every thread). `top_functions` turns that into two short
tables: self time (the innermost frame of each sample) and inclusive time
(every function on the stack, counted once per sample), as shares of the
samples of the event loop thread and of all threads.

`python -m bench.profile FILE` prints the same tables for a saved profile.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    """`func (path/to/module.py:12)` -> `func (module.py)`: one entry per function."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    file = match.group("file")
    parts = file.replace("\\", "/").split("/")
    # Keep the package folder too (e.g. kombu/messaging.py), but no machine paths.
    short = "/".join(parts[-2:]) if len(parts) >= 2 else file
    if "site-packages/" in file:
        short = file.split("site-packages/", 1)[1]
    elif "/lib/python" in file:
        short = "stdlib/" + file.split("/lib/python", 1)[1].split("/", 1)[-1]
    return f"{match.group('func')} ({short})"


def _area(frame: str) -> str:
    short = _short(frame)
    inside = short[short.rfind("(") + 1 : -1]
    return inside.split("/", 1)[0] if "/" in inside else inside


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text("utf-8", "replace").splitlines():
        head, _, count = line.rpartition(" ")
        if not head or not count.isdigit():
            continue
        stacks.append((head.split(";"), int(count)))
    return stacks


_PROJECT = ("hub/", "bridges/", "protocol/", "tasks/")


def _thread_name(frame: str) -> str | None:
    # With --threads py-spy starts each stack with "thread (<id>): <name>".
    if frame.startswith("thread ("):
        return frame.split("): ", 1)[1] if "): " in frame else frame
    return None


def top_functions(path: Path, what: str = "the hub", limit: int = 12) -> str:
    """Readable tables of the hottest functions in a py-spy raw profile."""
    if not path.exists():
        return f"profile: {path} was not written (did py-spy have permission to attach?)"
    stacks = load(path)
    total = sum(count for _, count in stacks)
    if not total:
        return f"profile: {path} has no samples"
    threads: Counter[str] = Counter()
    self_by_thread: dict[str, Counter[str]] = {}
    project_inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    for frames, count in stacks:
        # Leading pseudo-frames: with --subprocesses "process <pid>:"<command>"" (the
        # parent first), with --threads "thread (<id>): <name>".
        lead = 0
        while lead < len(frames) and frames[lead].startswith(("process ", "thread (")):
            lead += 1
        names = [_thread_name(f) for f in frames[:lead]]
        processes = [f.split(":", 1)[0] for f in frames[:lead] if f.startswith("process ")]
        thread = next((n for n in names if n), "")
        thread = " ".join([*processes[-1:], thread]).strip() or "all threads"
        code = frames[lead:]
        threads[thread] += count
        if not code:
            continue
        self_by_thread.setdefault(thread, Counter())[_short(code[-1])] += count
        areas[_area(code[-1])] += count
        for name in {_short(f) for f in code}:
            inside = name[name.rfind("(") + 1 : -1]
            if inside.startswith(_PROJECT) and not name.startswith(("run (", "serve (")):
                project_inclusive[name] += count

    def table(title: str, counter: Counter[str]) -> list[str]:
        rows = [title]
        for name, count in counter.most_common(limit):
            rows.append(f"  {100.0 * count / total:5.1f}%  {name}")
        return rows

    out = [f"profile of {what}: {total} CPU samples, all threads ({path}); shares of all samples"]
    out += table("by thread:", threads)
    for thread, _ in threads.most_common(3):
        out += table(f"self time in thread {thread} (innermost function):", self_by_thread[thread])
    out += table("inclusive time of the project's own functions:", project_inclusive)
    out += table("self time by package/module:", areas)
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.profile PROFILE.txt")
    print(top_functions(Path(sys.argv[1]), "the profiled process"))
