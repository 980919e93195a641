"""User handlers: your functions, run by workers for matching envelopes.

Layer: tasks; imports the `hub` core only.

Write a module, register functions with `@handler`, and name the module in
the `handlers` setting (`HUB_HANDLERS=myproject.hub_handlers`). Workers import
it and, after the built-in storage of each batch, run every matching handler
once per envelope, each run its own task on the `hub.handlers` queue::

    from hub.envelope import Envelope
    from tasks import send_command
    from tasks.handlers import handler

    @handler(kind="telemetry", devices="thermo-*")
    def cool_down(envelope: Envelope) -> None:
        if envelope.payload.get("temperature", 0) > 30:
            send_command(envelope.device_id, "set_interval", {"seconds": 1})

A handler that raises is retried (`HANDLER_MAX_RETRIES` times, with backoff);
after that the run becomes a dead letter in the database (`hub dead-letters
list`, replayable), and `hub status` counts it. Other handlers and devices
are not affected.

A run happens once per (envelope, handler): the worker keeps a ledger of runs
that ended (`handler_runs`) and skips a run delivered twice. What a handler
writes through `transaction()` commits together with its ledger row, so it
happens exactly once, even when a worker is killed mid-run. Other side
effects (a command sent, a call to another system) are at least once: a
worker killed between the handler's return and the ledger's commit runs it
again, so make them idempotent.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import traceback
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, insert, select
from sqlalchemy.exc import IntegrityError

from hub import worker_metrics
from hub.dead_letters import HANDLER_FAILED, NewDeadLetter
from hub.envelope import Envelope, Kind
from hub.errors import ConfigError, EnvelopeError
from hub.routing import HANDLER_QUEUE
from hub.storage import HandlerRunRow
from tasks.application import app
from tasks.counting import count_event
from tasks.db import engine
from tasks.wire import QUARANTINE_KEY

log = logging.getLogger(__name__)

HANDLER_MAX_RETRIES = 3
RUN_TASK = "tasks.handlers.run"
HandlerFunc = Callable[[Envelope], Any]


@dataclass(frozen=True, slots=True)
class Registration:
    name: str
    kinds: frozenset[Kind]
    devices: str
    func: HandlerFunc

    def matches(self, envelope: Envelope) -> bool:
        return envelope.kind in self.kinds and fnmatch.fnmatchcase(envelope.device_id, self.devices)


_registry: dict[str, Registration] = {}
#: The connection of the handler run under way (see `transaction()`).
_transaction: ContextVar[Connection | None] = ContextVar("hub_handler_transaction", default=None)
_loaded: tuple[str, ...] | None = None


def handler(
    *, kind: str | Kind | list[str | Kind] = "telemetry", devices: str = "*"
) -> Callable[[HandlerFunc], HandlerFunc]:
    """Register a function for envelopes of `kind` from devices matching `devices` (glob)."""
    kinds = [kind] if isinstance(kind, (str, Kind)) else list(kind)
    try:
        kind_set = frozenset(Kind(k) for k in kinds)
    except ValueError as exc:
        raise ConfigError(f"unknown envelope kind in handler registration: {exc}") from None

    def register(func: HandlerFunc) -> HandlerFunc:
        name = f"{func.__module__}.{func.__qualname__}"
        _registry[name] = Registration(name, kind_set, devices, func)
        return func

    return register


def load(modules: tuple[str, ...]) -> None:
    """Import the configured handler modules once per process."""
    global _loaded
    if _loaded == modules:
        return
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # boundary: user code, at import
            raise ConfigError(
                f"handler module {module!r} cannot be imported: {exc}",
                key="handlers",
                env="HUB_HANDLERS",
            ) from None
    _loaded = modules


def matching(envelope: Envelope) -> list[Registration]:
    return [r for r in _registry.values() if r.matches(envelope)]


def schedule(envelopes: list[Envelope], modules: tuple[str, ...]) -> int:
    """Queue one handler run per matching (envelope, handler); returns how many."""
    if not modules:
        return 0
    load(modules)
    scheduled = 0
    for env in envelopes:
        for registration in matching(env):
            run.apply_async(args=(registration.name, env.to_dict()), queue=HANDLER_QUEUE)
            scheduled += 1
    return scheduled


def dead_letter(
    name: str, envelope: dict[str, Any], error: BaseException, *, attempts: int = 1
) -> None:
    """Park a handler run that failed for good where operators can see and replay it."""
    from tasks.dead_letters import record

    quarantined = isinstance(envelope, dict) and QUARANTINE_KEY in envelope
    record(
        NewDeadLetter(
            source=name,
            reason=HANDLER_FAILED,
            error="".join(traceback.format_exception(error))[-4000:],
            envelope=envelope,
            attempts=attempts,
            task_name=None if quarantined else RUN_TASK,
            task_args=None if quarantined else [name, envelope],
        )
    )


@app.task(
    name=RUN_TASK,
    bind=True,
    # Whether a run already happened is the ledger's to say (handler_runs), in
    # the same database and transaction as the run; no result is written.
    ignore_result=True,
    acks_late=True,
    max_retries=HANDLER_MAX_RETRIES,
)
def run(self: Any, name: str, envelope: dict[str, Any]) -> None:
    """Run one handler on one envelope; retry, then dead-letter.

    The run happens inside a database transaction that ends by writing the
    ledger row (envelope id, handler). A second delivery of the same run (a
    worker killed after the run, before its acknowledgement; a redelivered
    batch scheduling its runs again) finds the row and is skipped. What the
    handler writes through `transaction()` commits with that row: exactly
    once. Other side effects are at least once (docs/delivery.md).
    """
    from tasks.application import context

    load(context().settings.handlers)
    registration = _registry.get(name)
    try:
        if registration is None:
            raise ConfigError(f"handler {name!r} is not registered in this worker")
        parsed = Envelope.from_dict(envelope)
        if not _run_once(registration, parsed):
            log.info("handler %s already ran for envelope %s; not again", name, parsed.id)
            return
    except (EnvelopeError, ConfigError) as exc:
        count_event(worker_metrics.TASK_FAILURES)
        dead_letter(name, envelope, exc)  # retrying cannot help
    except Exception as exc:  # boundary: a user handler
        if self.request.retries >= HANDLER_MAX_RETRIES:
            count_event(worker_metrics.TASK_FAILURES)
            dead_letter(name, envelope, exc, attempts=self.request.retries + 1)
            return
        log.warning(
            "handler %s raised %s; retry %d of %d",
            name,
            exc,
            self.request.retries + 1,
            HANDLER_MAX_RETRIES,
        )
        raise self.retry(exc=exc, countdown=0.5 * 2**self.request.retries) from None
    else:
        count_event(worker_metrics.HANDLER_RUNS)


def _run_once(registration: Registration, envelope: Envelope) -> bool:
    """Run the handler unless the ledger says it ran; False when it had.

    The ledger row is written last, in the transaction the handler sees through
    `transaction()`: a handler that raises leaves no row (and its writes there
    are rolled back), so the retry runs it again. Two deliveries of one run at
    the same moment: the second insert waits for the first's commit, then
    fails on the key and rolls back with everything it wrote.
    """
    key = {"envelope_id": envelope.id, "handler": registration.name}
    try:
        with engine().begin() as conn:
            ran = conn.execute(select(HandlerRunRow.envelope_id).filter_by(**key).limit(1))
            if ran.first() is not None:
                return False
            token = _transaction.set(conn)
            try:
                registration.func(envelope)
            finally:
                _transaction.reset(token)
            try:
                conn.execute(insert(HandlerRunRow).values(**key, ran_at=datetime.now(UTC)))
            except IntegrityError:
                # Leaving the block rolls back this delivery's writes with it.
                raise _AlreadyRan() from None
    except _AlreadyRan:
        return False  # another delivery of this run committed first
    return True


class _AlreadyRan(Exception):
    """The ledger row appeared while this delivery ran (a concurrent delivery)."""


def transaction() -> Connection:
    """The database connection of the handler run under way, inside its
    transaction. What a handler writes through it commits together with the
    run's ledger row, so a run delivered twice writes once; a handler that
    raises has its writes rolled back with the attempt.

    Raises RuntimeError outside a handler run.
    """
    conn = _transaction.get()
    if conn is None:
        raise RuntimeError("tasks.handlers.transaction() is only available inside a handler run")
    return conn
