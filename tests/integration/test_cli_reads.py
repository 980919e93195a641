"""Read commands never create a data folder or a database, and say where they looked.

A `hub telemetry` run from another folder used to create an empty
`./hub-data` and answer "no telemetry stored", which reads as a lost stream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.postgres import postgres_database
from tests.support.processes import ROOT

READS = [
    ["telemetry", "meter-1"],
    ["state", "meter-1"],
    ["devices", "list"],
    ["devices", "remove", "meter-1"],
    ["send", "meter-1", "ping", "--wait", "0"],
    ["status", "--url", "http://127.0.0.1:9/status"],
]


def hub(
    cwd: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
    environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "firmware-sim")])
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "hubapp.cli", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("command", READS, ids=lambda c: " ".join(c[:2]))
def test_a_read_in_another_folder_creates_nothing_and_says_where_it_looked(
    tmp_path: Path, command: list[str]
) -> None:
    result = hub(tmp_path, *command)
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    assert str(tmp_path / "hub-data") in result.stderr
    assert "HUB_DATA_DIR" in result.stderr and "--config" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_read_with_a_missing_database_file_names_the_setting(tmp_path: Path) -> None:
    missing = tmp_path / "elsewhere" / "hub.sqlite3"
    result = hub(tmp_path, "telemetry", "meter-1", env={"HUB_DATABASE_URL": f"sqlite:///{missing}"})
    assert result.returncode == 1
    assert str(missing) in result.stderr and "HUB_DATABASE_URL" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_reads_work_where_the_data_is(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert (
        hub(tmp_path, "devices", "add", "meter-1", env={"HUB_DATA_DIR": str(data)}).returncode == 0
    )
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    listed = hub(elsewhere, "devices", "list", "--json", env={"HUB_DATA_DIR": str(data)})
    assert listed.returncode == 0, listed.stderr
    assert [d["device_id"] for d in json.loads(listed.stdout)] == ["meter-1"]
    config = tmp_path / "hub.toml"
    config.write_text(f"data_dir = {json.dumps(str(data))}\n")
    shown = hub(elsewhere, "--config", str(config), "telemetry", "meter-1")
    assert shown.returncode == 0 and "no telemetry stored for meter-1" in shown.stderr
    assert list(elsewhere.iterdir()) == []


@pytest.mark.integration
def test_a_postgres_url_as_providers_print_it_just_works(tmp_path: Path) -> None:
    with postgres_database() as url:
        env = {"HUB_DATABASE_URL": url.replace("postgresql://", "postgres://", 1)}
        added = hub(tmp_path, "devices", "add", "pg-1", env=env)
        assert added.returncode == 0, added.stderr
        listed = hub(tmp_path, "devices", "list", "--json", env=env)
        assert listed.returncode == 0, listed.stderr
        assert [d["device_id"] for d in json.loads(listed.stdout)] == ["pg-1"]


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HUB_TCP_PROT": "7000"}, "did you mean HUB_TCP_PORT?"),
        ({"HUB_DATABASE_URL": "mysql://h/db"}, "database 'mysql' is not supported"),
    ],
)
def test_hub_run_refuses_a_typo_in_one_line(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    result = hub(tmp_path, "run", env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
