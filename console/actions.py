"""What the console does when someone changes something: the change, then its audit entry.

Layer: console; imports the `hub` core and `tasks` (commands and control
messages travel through RabbitMQ by task name and queue, never into `bridges`).

Routes call exactly one of these (or one read function of `hub.fleet`), so
that a rule lives here once for the API and the pages alike.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import Engine

from hub import accounts, audit
from hub.accounts import Principal
from hub.envelope import validate_device_id
from hub.errors import EnvelopeError, HubError
from hub.fleet import CommandInfo, get_command
from hub.registry import DeviceExists, Registry, UnknownDevice

log = logging.getLogger(__name__)

#: Most ids one CSV import may create.
MAX_IMPORT = 10_000


class InvalidInput(HubError):
    """The request is well-formed but its content is not acceptable (HTTP 422)."""


class NotFound(HubError):
    """What the request names does not exist (HTTP 404)."""


class Conflict(HubError):
    """It exists already (HTTP 409)."""


class Unavailable(HubError):
    """A service the request needs (RabbitMQ) cannot be reached (HTTP 503)."""


def _valid_device_id(device_id: str) -> str:
    try:
        validate_device_id(device_id)
    except EnvelopeError as exc:
        raise InvalidInput(str(exc)) from None
    return device_id


def add_device(engine: Engine, who: Principal, device_id: str) -> str:
    """Register a device; returns its credential (shown once)."""
    _valid_device_id(device_id)
    try:
        credential = Registry(engine).add(device_id)
    except DeviceExists as exc:
        raise Conflict(str(exc)) from None
    audit.record(engine, who.label, "device.add", device_id)
    return credential


@dataclass(frozen=True, slots=True)
class Imported:
    created: list[tuple[str, str]]
    errors: list[str]


def parse_id_csv(text: str) -> list[str]:
    """Device ids from a CSV: the first column, or the column named `id`; blank lines skipped."""
    rows = [row for row in csv.reader(io.StringIO(text)) if row and any(c.strip() for c in row)]
    if not rows:
        raise InvalidInput("the CSV holds no device ids")
    column = 0
    header = [c.strip().lower() for c in rows[0]]
    if "id" in header:
        column = header.index("id")
        rows = rows[1:]
    ids = [row[column].strip() for row in rows if len(row) > column and row[column].strip()]
    if len(ids) > MAX_IMPORT:
        raise InvalidInput(f"at most {MAX_IMPORT} devices per import ({len(ids)} given)")
    return ids


def import_devices(engine: Engine, who: Principal, text: str) -> Imported:
    """Register every id of a CSV; one bad or existing id does not stop the others."""
    registry = Registry(engine)
    created: list[tuple[str, str]] = []
    errors: list[str] = []
    seen: set[str] = set()
    for device_id in parse_id_csv(text):
        if device_id in seen:
            errors.append(f"{device_id}: listed twice")
            continue
        seen.add(device_id)
        try:
            _valid_device_id(device_id)
            created.append((device_id, registry.add(device_id)))
        except (InvalidInput, HubError) as exc:
            errors.append(f"{device_id}: {exc}")
    audit.record(
        engine,
        who.label,
        "device.import",
        f"{len(created)} devices",
        {"created": [d for d, _ in created], "errors": len(errors)},
    )
    return Imported(created, errors)


def _tell_hubs(device_id: str, reason: str) -> int:
    """Ask the hubs to reload the credential and drop the device (best effort)."""
    from tasks.commands import disconnect_device

    try:
        return disconnect_device(device_id, reason)
    except Exception as exc:  # boundary: RabbitMQ away; the hubs refresh on the next connect
        log.warning("could not tell the hubs to disconnect %r: %s", device_id, exc)
        return -1


def remove_device(engine: Engine, who: Principal, device_id: str) -> None:
    if not Registry(engine).remove(device_id):
        raise NotFound(f"no device {device_id!r}")
    hubs_told = _tell_hubs(device_id, "removed")
    audit.record(engine, who.label, "device.remove", device_id, {"hubs_told": hubs_told})


def rekey_device(engine: Engine, who: Principal, device_id: str) -> str:
    """A new credential; the old one stops working, and connections made with it are dropped."""
    try:
        credential = Registry(engine).rekey(device_id)
    except UnknownDevice as exc:
        raise NotFound(str(exc)) from None
    hubs_told = _tell_hubs(device_id, "re-keyed")
    audit.record(engine, who.label, "device.rekey", device_id, {"hubs_told": hubs_told})
    return credential


def send_command(
    engine: Engine, who: Principal, device_id: str, name: str, args: dict[str, Any], ttl: float
) -> str:
    """Send a command (it waits in the database while no hub holds the device); its id."""
    if not Registry(engine).exists(device_id):
        raise NotFound(f"no device {device_id!r}")
    from tasks import send_command as send

    try:
        result = send(device_id, name, args, ttl=ttl)
    except HubError as exc:
        raise InvalidInput(str(exc)) from None
    except Exception as exc:  # boundary: the broker is unreachable or refuses us
        raise Unavailable(f"could not send the command (is RabbitMQ reachable?): {exc}") from None
    audit.record(engine, who.label, "command.send", device_id, {"command": result.id, "name": name})
    return str(result.id)


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    info: CommandInfo
    result: Any
    error: str | None


def command_outcome(engine: Engine, command_id: str) -> CommandOutcome:
    """A command's status from the database, and its reply or error from the result backend."""
    info = get_command(engine, command_id)
    if info is None:
        raise NotFound(f"no command {command_id!r}")
    result: Any = None
    error: str | None = None
    if info.status in ("succeeded", "failed", "expired"):
        from celery.result import AsyncResult

        from tasks.application import app

        outcome = AsyncResult(command_id, app=app)
        # The worker moves the row out of `pending` just before it writes the
        # result: give it a moment, and until then the reply is still arriving.
        deadline = time.monotonic() + 2.0
        while not outcome.ready() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not outcome.ready():
            return CommandOutcome(replace(info, status="delivered"), None, None)
        value = outcome.result
        if isinstance(value, BaseException):
            error = str(value)
        else:
            result = value
    return CommandOutcome(info, result, error)


def add_account(engine: Engine, who: Principal, kind: str, name: str, role: str) -> str:
    """A new user (returns its password) or API token (returns the token)."""
    try:
        secret = (accounts.add_user if kind == "user" else accounts.add_token)(engine, name, role)
    except accounts.AccountExists as exc:
        raise Conflict(str(exc)) from None
    except accounts.AccountError as exc:
        raise InvalidInput(str(exc)) from None
    audit.record(engine, who.label, f"{kind}.add", name, {"role": role})
    return secret


def remove_account(engine: Engine, who: Principal, kind: str, name: str) -> None:
    remove = accounts.remove_user if kind == "user" else accounts.remove_token
    if not remove(engine, name):
        raise NotFound(f"no {kind} {name!r}")
    audit.record(engine, who.label, f"{kind}.remove", name)


def _dead_letter_error(exc: Exception) -> HubError:
    message = str(exc)
    return NotFound(message) if message.startswith("no dead letter") else Conflict(message)


def replay_dead_letter(engine: Engine, who: Principal, letter_id: str) -> str:
    """Send the letter's task again (once); returns the new task's id."""
    from hub.dead_letters import DeadLetterError
    from tasks.dead_letters import replay

    try:
        task_id = replay(letter_id)
    except DeadLetterError as exc:
        raise _dead_letter_error(exc) from None
    except Exception as exc:  # boundary: the broker is unreachable; the letter stays dead
        raise Unavailable(f"could not replay (is RabbitMQ reachable?): {exc}") from None
    audit.record(engine, who.label, "dead_letter.replay", letter_id, {"task": task_id})
    return task_id


def discard_dead_letter(engine: Engine, who: Principal, letter_id: str) -> None:
    from hub.dead_letters import DeadLetterError, mark_discarded

    try:
        mark_discarded(engine, letter_id)
    except DeadLetterError as exc:
        raise _dead_letter_error(exc) from None
    audit.record(engine, who.label, "dead_letter.discard", letter_id)


def dead_letter(engine: Engine, letter_id: str) -> dict[str, Any]:
    from hub.dead_letters import DeadLetterError, get_dead_letter

    try:
        return get_dead_letter(engine, letter_id)
    except DeadLetterError as exc:
        raise _dead_letter_error(exc) from None
