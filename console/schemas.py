"""Request and response bodies of the HTTP API (they make its OpenAPI schema).

Layer: console; imports pydantic only.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

CommandStatus = Literal["pending", "delivered", "succeeded", "failed", "expired"]


class Problem(BaseModel):
    """Every error: a status code and one readable message."""

    detail: str


class DeviceSummary(BaseModel):
    id: str
    online: bool
    last_seen: datetime | None
    transport: str | None
    hub: str | None = Field(description="The hub process holding the connection, while online.")


class DevicePage(BaseModel):
    items: list[DeviceSummary]
    total: int
    offset: int
    limit: int


class NewDevice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=128, examples=["thermo-7"])


class Credential(BaseModel):
    id: str
    credential: str = Field(description="Shown once; only its hash is stored.")


class ImportResult(BaseModel):
    created: list[Credential]
    errors: list[str] = Field(description="One line per id that was not created, with why.")


class DeviceDetail(DeviceSummary):
    created_at: datetime
    state: dict[str, Any]
    last_values: dict[str, Any]


class TelemetryRow(BaseModel):
    received_at: datetime
    device_time: datetime | None
    seq: int | None
    values: dict[str, Any]


class TelemetryPage(BaseModel):
    device: str
    items: list[TelemetryRow] = Field(description="Newest first.")


class NewCommand(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, examples=["ping"])
    args: dict[str, Any] = Field(default_factory=dict)
    ttl: float = Field(default=60.0, gt=0, le=7 * 24 * 3600, description="Seconds it may wait.")


class CommandAccepted(BaseModel):
    id: str


class Command(BaseModel):
    id: str
    device: str
    name: str
    args: dict[str, Any]
    status: CommandStatus
    result: Any = None
    error: str | None = None
    created_at: datetime
    finished_at: datetime | None


class Listener(BaseModel):
    name: str
    host: str
    port: int
    detail: str


class Hub(BaseModel):
    id: str
    version: str
    mode: str
    hostname: str
    pid: int
    listeners: list[Listener]
    devices_connected: dict[str, int]
    spool_messages: int
    broker_connected: bool
    started_at: datetime
    last_heartbeat: datetime
    alive: bool


class Health(BaseModel):
    status: Literal["ok"]


class DeadLetter(BaseModel):
    id: str
    created_at: datetime
    updated_at: datetime
    source: str = Field(description="The task or stage that gave up.")
    reason: str = Field(description="invalid_envelope, too_deep, store_failed, ...")
    error: str = Field(description="Why it failed.")
    envelope_id: str | None
    device_id: str | None
    attempts: int
    status: Literal["dead", "replayed", "discarded"]
    replayable: bool
    payload: str | None = Field(default=None, description="Only in the single-letter view.")


class DeadLetterPage(BaseModel):
    items: list[DeadLetter]
    counts: dict[str, int]


class Replayed(BaseModel):
    id: str
    task_id: str = Field(description="The Celery task sent again.")
