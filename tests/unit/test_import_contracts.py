"""The import-linter contracts in pyproject.toml catch what they promise to.

Each test copies the packages and pyproject.toml into a temporary folder
(never into the repository), plants one module that breaks a rule, and runs
`lint-imports` on the copy: it must fail and name the broken contract. The
unplanted copy must pass, so that a failure means the planted module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["hub", "hubapp", "bridges", "tasks", "console", "localqueue"]

LAYERS = "layers: hubapp > console > bridges | tasks | firmware_sim > hub | localqueue"
PURE_CORE = "the hub core is pure: no event loop, sockets, Celery, kombu or MQTT libraries"
CONSOLE = "the console never imports bridges or the simulator"


def _copy(tmp_path: Path) -> Path:
    copy = tmp_path / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "static", "templates")
    for name in PACKAGES:
        shutil.copytree(ROOT / name, copy / name, ignore=ignore)
    simulator = Path("firmware-sim", "firmware_sim")
    shutil.copytree(ROOT / simulator, copy / simulator, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    return copy


def _lint(copy: Path) -> subprocess.CompletedProcess[str]:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    env = dict(os.environ)
    # The copy comes first on the path, ahead of the editable install of the
    # repository (its finder is consulted after the path).
    env["PYTHONPATH"] = os.pathsep.join([str(copy), str(copy / "firmware-sim")])
    return subprocess.run(
        [str(lint_imports), "--config", str(copy / "pyproject.toml"), "--no-cache"],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _copy(tmp_path_factory.mktemp("contracts"))


def test_the_unplanted_copy_keeps_every_contract(pristine: Path) -> None:
    result = _lint(pristine)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("planted", "source", "contract", "says"),
    [
        # A new core module reaching up into a transport: the whole-package
        # layers contract catches it, not a list of module names.
        ("hub/planted.py", "import bridges.tcp\n", LAYERS, "hub.planted -> bridges.tcp"),
        ("hub/planted.py", "import asyncio\n", PURE_CORE, "hub.planted -> asyncio"),
        ("hub/protocol/planted.py", "import socket\n", PURE_CORE, "hub.protocol.planted -> socket"),
        ("hub/planted.py", "from kombu import Queue\n", PURE_CORE, "hub.planted -> kombu"),
        ("tasks/planted.py", "import bridges.dispatch\n", LAYERS, "tasks.planted -> bridges"),
        ("bridges/planted.py", "import hubapp.app\n", LAYERS, "bridges.planted -> hubapp.app"),
        ("localqueue/planted.py", "import hub.envelope\n", LAYERS, "localqueue.planted -> hub"),
        ("console/planted.py", "import bridges.tcp\n", CONSOLE, "console.planted -> bridges.tcp"),
    ],
)
def test_a_planted_violation_breaks_its_contract(
    tmp_path: Path, planted: str, source: str, contract: str, says: str
) -> None:
    copy = _copy(tmp_path)
    (copy / planted).write_text(f'"""Planted by a test."""\n\n{source}')
    result = _lint(copy)
    assert result.returncode != 0, result.stdout
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout
    assert says in broken, result.stdout
    assert not (ROOT / planted).exists()


def test_no_import_circle_is_left_in_any_package() -> None:
    # Strongly connected groups of two or more modules: each is an import circle.
    packages = (*PACKAGES, "firmware_sim")
    graph = grimp.build_graph(*packages)
    modules = sorted(graph.modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for module in modules:
        if module not in index:
            visit(module)
    assert circles == []
