"""The upkeep's sweep of commands whose `expire` task was lost (tasks/commands.py).

Real database and result backend of the run (tests/conftest.py); no worker:
the sweep is called as the upkeep thread calls it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery.result import AsyncResult
from sqlalchemy import Engine

from hub.commands import EXPIRED, PENDING, command_status, create_command

pytestmark = pytest.mark.integration


def test_an_open_command_past_its_ttl_and_the_grace_is_expired_once(
    command_api: Any, engine: Engine
) -> None:
    from tasks.application import app
    from tasks.commands import EXPIRY_SWEEP_GRACE, sweep_expired

    command_id = uuid.uuid4().hex
    # Recorded as send_command does, but its expire task never sent (as if lost).
    create_command(engine, command_id, "sweep-dev", "ping", {}, ttl_s=1)
    now = datetime.now(UTC)
    sweep_expired(now)
    assert command_status(engine, command_id) == PENDING  # within the grace: left to expire
    later = now + EXPIRY_SWEEP_GRACE + timedelta(seconds=5)
    assert sweep_expired(later) >= 1
    assert command_status(engine, command_id) == EXPIRED
    result = AsyncResult(command_id, app=app)
    assert result.state == "FAILURE" and "CommandExpired" in (result.traceback or "")
    sweep_expired(later)  # a second sweep changes nothing
    assert command_status(engine, command_id) == EXPIRED
