"""Smoke test of `python -m bench against`: HEAD against itself, one short round.

It checks that the command checks the revision out into a temporary worktree
and removes it afterwards, that each side imports its own tree, and that the
table and the JSON line carry a ratio. No timed assertions: the figures
themselves are not checked, only that they are there.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.services import require_rabbitmq

pytestmark = [pytest.mark.integration, pytest.mark.bench]

ROOT = Path(__file__).resolve().parents[2]


def _worktrees() -> str:
    return subprocess.run(
        ["git", "worktree", "list", "--porcelain"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def test_against_head_prints_a_ratio_and_removes_its_worktree() -> None:
    require_rabbitmq()
    completed = subprocess.run(
        [
            sys.executable, "-m", "bench", "against", "HEAD", "--rounds", "1",
            "--transport", "tcp", "--json",
            "--", "--devices", "2", "--duration", "2", "--rate", "100",
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=150, check=False,
    )  # fmt: skip

    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line on stdout, got: {completed.stdout[-2000:]}"
    result = json.loads(lines[0])
    assert result["benchmark"] == "against"
    assert result["imports"]["current"]["hub"].startswith(str(ROOT))
    assert not result["imports"]["rev"]["hub"].startswith(str(ROOT) + "/")
    tcp = result["summary"]["tcp"]
    assert tcp["rev"]["runs"] == tcp["current"]["runs"] == 1
    assert tcp["rev"]["all_stored"] and tcp["current"]["all_stored"]
    assert tcp["ratio"]["stored_per_s"] is not None
    assert "current/REV" in completed.stderr
    assert "stored msg/s (median)" in completed.stderr
    # The temporary worktree of REV is gone, from git's list and from the disk.
    rev_tree = Path(result["imports"]["rev"]["hub"]).parents[1]
    assert f"worktree {rev_tree}\n" not in _worktrees()
    assert not rev_tree.exists()
