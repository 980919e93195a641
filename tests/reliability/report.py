"""Render the reliability results (JSON lines) as a markdown table.

    python -m tests.reliability.report [results.jsonl]

Without an argument it reads `$RELIABILITY_RESULTS` or
`build/reliability/results.jsonl`. When a scenario ran more than once, its
last result counts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tests.reliability.harness import results_path

COLUMNS = (
    "scenario",
    "transport",
    "acknowledged",
    "stored",
    "lost",
    "duplicates",
    "unprocessed",
    "recovery_s",
)
HEADINGS = (
    "scenario",
    "transport",
    "acknowledged",
    "stored",
    "lost",
    "duplicates",
    "handler runs missing",
    "recovery (s)",
)


def load(path: Path) -> list[dict[str, Any]]:
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            latest[(row["scenario"], row["transport"])] = row
    return list(latest.values())


def render(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(HEADINGS) + " |", "|" + " --- |" * len(HEADINGS)]
    for row in rows:
        cells = ["-" if row.get(c) is None else str(row[c]) for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else results_path()
    if not path.exists():
        print(f"no results at {path}; run `pytest -m reliability tests/reliability` first")
        return 1
    print(render(load(path)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
