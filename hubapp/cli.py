"""The `hub` command: run the hub, manage devices, read what they sent.

Layer: composition root (imports `hub.app`, which imports `bridges`).

Every error the user can cause (a port in use, a bad setting, an unwritable
data folder, an unreachable broker) is one readable line and a non-zero exit
status; `--verbose` adds the traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from hub import __version__
from hub.errors import ConfigError, HubError
from hub.settings import Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, default=_json_default))


def friendly_errors(func: F) -> F:
    """Turn HubErrors into one line on stderr and an exit status (2 for configuration)."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        try:
            return func(*args, **kwargs)
        except ConfigError as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            click.echo(f"hub: configuration error: {exc}", err=True)
            sys.exit(2)
        except HubError as exc:
            if ctx.obj and ctx.obj.get("verbose"):
                raise
            click.echo(f"hub: error: {exc}", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
    return load_settings(ctx.obj.get("config"), **overrides)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="Configuration: a TOML file (--config or HUB_CONFIG) and HUB_* environment "
    "variables; see docs/configuration.md.",
)
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML configuration file (default: $HUB_CONFIG).",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and full tracebacks.")
@click.version_option(__version__, prog_name="hub")
@click.pass_context
def main(ctx: click.Context, config: Path | None, verbose: bool) -> None:
    """A hub for device fleets: TCP and MQTT devices in, Celery tasks out."""
    ctx.ensure_object(dict)
    ctx.obj["config"] = config
    ctx.obj["verbose"] = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        # amqtt and kombu are chatty at INFO about every client and connection.
        for name in ("amqtt", "transitions", "kombu", "celery", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)


@main.command(
    epilog="Examples:\n\n\b\n  hub run\n  hub run --tcp-port 7700 --mqtt-port 1884\n"
    "  HUB_BROKER_URL=amqp://guest:guest@127.0.0.1:5672// hub run"
)
@click.option("--host", help="Address to listen on (HUB_HOST, default 0.0.0.0).")
@click.option("--tcp-port", type=int, help="Native protocol TCP port (HUB_TCP_PORT, 7700).")
@click.option("--mqtt-port", type=int, help="Embedded MQTT broker port (HUB_MQTT_PORT, 1883).")
@click.option("--http-port", type=int, help="Status and metrics port (HUB_HTTP_PORT, 8080).")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Data folder (HUB_DATA_DIR).")
@click.option("--broker-url", help="RabbitMQ URL; empty runs the embedded default.")
@click.option("--no-mqtt", is_flag=True, help="Do not start the MQTT side.")
@click.option(
    "--worker/--no-worker",
    default=None,
    help="Run a task worker alongside the hub (default: only in the embedded mode).",
)
@click.pass_context
@friendly_errors
def run(ctx: click.Context, /, no_mqtt: bool, worker: bool | None, **options: Any) -> None:
    """Serve devices: TCP listeners, MQTT broker, dispatch to tasks."""
    if no_mqtt:
        options["mqtt_enabled"] = False
    settings = _settings(ctx, **options)
    try:
        from hubapp.app import serve

        run_loop(serve(settings, run_worker=worker), settings.event_loop)
    except KeyboardInterrupt:
        pass


def run_loop(main_coro: Any, choice: str) -> None:
    """Run the hub on uvloop where installed (or asked for), else on asyncio."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                main_coro.close()
                raise ConfigError(
                    "event_loop = 'uvloop' but uvloop is not installed (pip install -e '.[fast]')",
                    key="event_loop",
                    env="HUB_EVENT_LOOP",
                ) from None
        else:
            uvloop.run(main_coro)
            return
    asyncio.run(main_coro)


@main.group()
def devices() -> None:
    """Register, list and remove devices."""


def _registry(ctx: click.Context, *, create: bool = False) -> Any:
    from hub.registry import Registry

    return Registry(_engine(ctx, create=create))


def _audit(registry: Any, action: str, device_id: str) -> None:
    """Changes made from the command line go into the console's audit log too."""
    from hub import audit

    audit.record(registry.engine, "cli", action, device_id)


@devices.command("add")
@click.argument("device_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@friendly_errors
def devices_add(ctx: click.Context, device_id: str, as_json: bool) -> None:
    """Register DEVICE_ID and print its new credential (shown only once)."""
    registry = _registry(ctx, create=True)
    credential = registry.add(device_id)
    _audit(registry, "device.add", device_id)
    if as_json:
        _emit_json({"device_id": device_id, "credential": credential})
    else:
        click.echo(f"device {device_id} added; its credential (shown only once):")
        click.echo(credential)


@devices.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@friendly_errors
def devices_list(ctx: click.Context, as_json: bool) -> None:
    """List registered devices."""
    records = _registry(ctx).devices()
    if as_json:
        _emit_json([{"device_id": r.id, "created_at": r.created_at} for r in records])
        return
    for r in records:
        click.echo(f"{r.id}\t{r.created_at:%Y-%m-%d %H:%M:%S}")
    if not records:
        click.echo("no devices; add one with `hub devices add ID`", err=True)


@devices.command("remove")
@click.argument("device_id")
@click.pass_context
@friendly_errors
def devices_remove(ctx: click.Context, device_id: str) -> None:
    """Remove DEVICE_ID from the registry (its data stays)."""
    registry = _registry(ctx)
    if not registry.remove(device_id):
        raise HubError(f"no device {device_id!r}")
    _audit(registry, "device.remove", device_id)
    click.echo(f"device {device_id} removed")


def _engine(ctx: click.Context, *, create: bool = False) -> Any:
    """The hub's database, brought to the newest schema. Only a command that
    writes (`create`) may make a new one: a read command run in the wrong
    folder must not answer from an empty database it just created."""
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    from hub.storage import make_engine, migrate, sqlite_path

    settings = _settings(ctx)
    url = settings.effective_database_url
    path = sqlite_path(url)
    if not create and path is not None and not path.exists():
        if settings.database_url:
            raise HubError(
                f"no database at {path}; point database_url / HUB_DATABASE_URL at the "
                "hub's database (or --config <hub.toml>)"
            )
        raise HubError(
            f"no hub data in {settings.data_dir.resolve()} (looked for {path.name}); run "
            "this where the hub keeps its data, or point at it with "
            "HUB_DATA_DIR=<data folder> or --config <hub.toml>"
        )
    try:
        migrate(url)
    except SQLAlchemyError as exc:
        cause = exc.orig if isinstance(exc, DBAPIError) else exc
        reason = str(cause).splitlines()[0]
        raise HubError(f"cannot open the database ({reason}); check HUB_DATABASE_URL") from None
    return make_engine(url)


@main.command()
@click.argument("device_id")
@click.option("--last", default=10, show_default=True, help="How many messages.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@friendly_errors
def telemetry(ctx: click.Context, device_id: str, last: int, as_json: bool) -> None:
    """Show the newest telemetry stored for DEVICE_ID."""
    from hub.storage import recent_telemetry

    rows = recent_telemetry(_engine(ctx), device_id, last)
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        click.echo(f"no telemetry stored for {device_id}", err=True)
    for row in rows:
        values = json.dumps(row["payload"], separators=(",", ":"))
        click.echo(f"{row['received_at']:%Y-%m-%d %H:%M:%S.%f}  seq={row['seq']}  {values}")


@main.command()
@click.argument("device_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@friendly_errors
def state(ctx: click.Context, device_id: str, as_json: bool) -> None:
    """Show DEVICE_ID's last known state and whether it is online."""
    from hub.storage import device_state

    row = device_state(_engine(ctx), device_id)
    if row is None:
        raise HubError(f"nothing stored yet for device {device_id!r}")
    if as_json:
        _emit_json(row)
        return
    click.echo(f"device      {device_id}")
    click.echo(f"online      {'yes' if row['online'] else 'no'} (via {row['transport']})")
    click.echo(f"last seen   {row['last_seen_at']}")
    click.echo(f"last values {json.dumps(row['last_values'])}")
    click.echo(f"state       {json.dumps(row['state'])}")


@main.command(
    epilog="Examples:\n\n\b\n  hub send tcp-1 ping\n"
    "  hub send thermo-7 set_interval --args '{\"seconds\": 5}' --ttl 300 --wait 10"
)
@click.argument("device_id")
@click.argument("command")
@click.option("--args", "args_json", default="{}", help="Arguments as a JSON object.")
@click.option("--ttl", default=60.0, show_default=True, help="Seconds the command may wait.")
@click.option(
    "--wait",
    default=None,
    type=float,
    help="Seconds to wait for the reply (default: the ttl); 0 prints the command id and returns.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@friendly_errors
def send(
    ctx: click.Context,
    device_id: str,
    command: str,
    args_json: str,
    ttl: float,
    wait: float | None,
    as_json: bool,
) -> None:
    """Send COMMAND to DEVICE_ID and print its reply (or the error, exit status 1)."""
    try:
        args = json.loads(args_json)
    except ValueError as exc:
        raise HubError(f"--args is not JSON: {exc}") from None
    if not isinstance(args, dict):
        raise HubError("--args must be a JSON object")
    from celery.exceptions import TimeoutError as ResultTimeout

    import tasks.application
    from hub.errors import CommandError

    settings = _settings(ctx)
    _engine(ctx).dispose()  # an existing database, at the newest schema
    tasks.application.configure(settings)
    from tasks import send_command

    try:
        result = send_command(device_id, command, args, ttl=ttl)
    except HubError:
        raise
    except Exception as exc:  # boundary: the broker is unreachable or refuses us
        raise HubError(f"could not send the command: {exc}") from None
    if wait == 0:
        if as_json:
            _emit_json({"command_id": result.id})
        else:
            click.echo(result.id)
        return
    try:
        reply = result.get(timeout=wait if wait is not None else ttl + 5)
    except CommandError as exc:
        if as_json:
            _emit_json({"command_id": result.id, "ok": False, "error": str(exc)})
        raise HubError(str(exc)) from None
    except ResultTimeout:
        raise HubError(f"no reply within {wait} s (command {result.id} still pending)") from None
    if as_json:
        _emit_json({"command_id": result.id, "ok": True, "result": reply})
    else:
        click.echo(json.dumps(reply, default=_json_default))


@main.command(
    epilog="Examples:\n\n\b\n  hub console\n  HUB_CONSOLE_PORT=9000 hub console\n"
    "  hub users add alice --role admin   # then log in at http://127.0.0.1:8081/"
)
@click.option("--host", help="Address to listen on (HUB_HOST, default 0.0.0.0).")
@click.option("--port", "console_port", type=int, help="Port (HUB_CONSOLE_PORT, 8081).")
@click.pass_context
@friendly_errors
def console(ctx: click.Context, /, **options: Any) -> None:
    """Serve the web console and HTTP API (a process of its own, beside `hub run`)."""
    settings = _settings(ctx, **options)
    from console.server import serve

    with contextlib.suppress(KeyboardInterrupt):
        serve(settings)


def _accounts_engine(ctx: click.Context) -> Any:
    return _engine(ctx)


def _account_group(kind: str, secret_name: str) -> click.Group:
    plural = f"{kind}s"

    @click.group(
        name=plural, help=f"Console {plural}: add (prints the {secret_name} once), list, remove."
    )
    def group() -> None:
        pass

    @group.command(
        "add", help=f"Add a {kind} NAME with a role; prints its {secret_name} (shown only once)."
    )
    @click.argument("name")
    @click.option(
        "--role",
        type=click.Choice(["viewer", "operator", "admin"]),
        required=True,
        help="viewer reads; operator also sends commands and replays dead letters; "
        "admin also changes devices, users and tokens.",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.pass_context
    @friendly_errors
    def add(ctx: click.Context, name: str, role: str, as_json: bool) -> None:
        from hub import accounts, audit

        engine = _accounts_engine(ctx)
        secret = (accounts.add_user if kind == "user" else accounts.add_token)(engine, name, role)
        audit.record(engine, "cli", f"{kind}.add", name, {"role": role})
        if as_json:
            _emit_json({"name": name, "role": role, secret_name: secret})
        else:
            click.echo(f"{kind} {name} ({role}) added; its {secret_name} (shown only once):")
            click.echo(secret)

    @group.command("list", help=f"List console {plural}.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.pass_context
    @friendly_errors
    def list_(ctx: click.Context, as_json: bool) -> None:
        from hub import accounts

        engine = _accounts_engine(ctx)
        found = accounts.users(engine) if kind == "user" else accounts.tokens(engine)
        if as_json:
            _emit_json(
                [{"name": a.name, "role": a.role, "created_at": a.created_at} for a in found]
            )
            return
        for a in found:
            click.echo(f"{a.name}\t{a.role}\t{a.created_at:%Y-%m-%d %H:%M:%S}")
        if not found:
            click.echo(f"no {plural}; add one with `hub {plural} add NAME --role ...`", err=True)

    @group.command("remove", help=f"Remove a {kind}; it can no longer log in or call the API.")
    @click.argument("name")
    @click.pass_context
    @friendly_errors
    def remove(ctx: click.Context, name: str) -> None:
        from hub import accounts, audit

        engine = _accounts_engine(ctx)
        removed = (accounts.remove_user if kind == "user" else accounts.remove_token)(engine, name)
        if not removed:
            raise HubError(f"no {kind} {name!r}")
        audit.record(engine, "cli", f"{kind}.remove", name)
        click.echo(f"{kind} {name} removed")

    return group


main.add_command(_account_group("user", "password"))
main.add_command(_account_group("token", "token"))


@main.group("dead-letters")
def dead_letters_group() -> None:
    """What workers could not process: list, show, replay or discard it."""


@dead_letters_group.command("list")
@click.option(
    "--status",
    type=click.Choice(["dead", "replayed", "discarded", "all"]),
    default="dead",
    show_default=True,
    help="Which dead letters.",
)
@click.option("--limit", default=100, show_default=True, help="How many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@friendly_errors
def dead_letters_list(ctx: click.Context, status: str, limit: int, as_json: bool) -> None:
    """List dead letters, newest first."""
    from hub.dead_letters import list_dead_letters

    rows = list_dead_letters(_engine(ctx), status=None if status == "all" else status, limit=limit)
    if as_json:
        _emit_json(rows)
        return
    if not rows:
        click.echo(f"no dead letters ({status})", err=True)
    for row in rows:
        who = row["device_id"] or "-"
        # The last line of a traceback is the error itself.
        error = (row["error"].strip().splitlines() or [""])[-1][:80]
        click.echo(
            f"{row['id']}  {row['created_at']:%Y-%m-%d %H:%M:%S}  {row['status']:<9} "
            f"{row['reason']:<16} {who:<24} {row['source']}  {error}"
        )


@dead_letters_group.command("show")
@click.argument("letter_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@friendly_errors
def dead_letters_show(ctx: click.Context, letter_id: str, as_json: bool) -> None:
    """Show one dead letter with its error and payload."""
    from hub.dead_letters import get_dead_letter

    row = get_dead_letter(_engine(ctx), letter_id)
    if as_json:
        _emit_json(row)
        return
    for key in ("id", "status", "reason", "source", "device_id", "envelope_id", "attempts"):
        click.echo(f"{key:<12} {row[key]}")
    click.echo(f"{'created_at':<12} {row['created_at']}")
    click.echo(f"{'updated_at':<12} {row['updated_at']}")
    click.echo(f"{'replayable':<12} {'yes' if row['replayable'] else 'no'}")
    click.echo("error:")
    click.echo(row["error"])
    click.echo("payload:")
    click.echo(row["payload"])


@dead_letters_group.command("replay")
@click.argument("letter_id")
@click.pass_context
@friendly_errors
def dead_letters_replay(ctx: click.Context, letter_id: str) -> None:
    """Send a dead letter's task again (it becomes `replayed`)."""
    import tasks.application
    from hub.storage import migrate

    settings = _settings(ctx)
    migrate(settings.effective_database_url)
    tasks.application.configure(settings)
    from tasks.dead_letters import replay

    try:
        task_id = replay(letter_id)
    except HubError:
        raise
    except Exception as exc:  # boundary: the broker is unreachable or refuses us
        raise HubError(f"could not replay {letter_id}: {exc}") from None
    click.echo(f"dead letter {letter_id} replayed as task {task_id}")


@dead_letters_group.command("discard")
@click.argument("letter_id")
@click.pass_context
@friendly_errors
def dead_letters_discard(ctx: click.Context, letter_id: str) -> None:
    """Mark a dead letter as dealt with; it is kept, as `discarded`."""
    from hub.dead_letters import mark_discarded

    mark_discarded(_engine(ctx), letter_id)
    click.echo(f"dead letter {letter_id} discarded")


@main.command()
@click.option("--url", help="The hub's status URL (default: http://127.0.0.1:<http_port>/status).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@friendly_errors
def status(ctx: click.Context, url: str | None, as_json: bool) -> None:
    """Show the hub's listeners, connected devices and spool, and the queue depths."""
    from bridges.queues import queue_depths

    settings = _settings(ctx)
    url = url or f"http://127.0.0.1:{settings.http_port}/status"
    data: dict[str, Any] = {"hub": None, "queues": None}
    problems = []
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            data["hub"] = json.load(response)
    except (urllib.error.URLError, OSError) as exc:
        problems.append(f"no hub answers at {url} ({exc}); is `hub run` running?")
    queue_file = settings.local_queue_path
    if queue_file is not None and not queue_file.exists():
        # Asking would create an empty local queue in a folder that is not the hub's.
        problems.append(
            f"no local queue in {settings.data_dir.resolve()} (looked for {queue_file.name}); "
            "point at the hub's data with HUB_DATA_DIR=<data folder> or --config <hub.toml>"
        )
    else:
        try:
            data["queues"] = queue_depths(settings.effective_broker_url)
        except Exception as exc:  # boundary: report an unreachable broker, do not crash
            problems.append(f"task broker unreachable: {exc}")
    if as_json:
        data["problems"] = problems
        _emit_json(data)
    else:
        hub = data["hub"]
        if hub is not None:
            click.echo(f"mode        {hub['mode']}")
            for listener in hub["listeners"]:
                click.echo(
                    f"listening   {listener['name']:<12} {listener['host']}:{listener['port']}"
                )
            connected = ", ".join(f"{k} {v}" for k, v in hub["devices_connected"].items())
            click.echo(f"devices     {connected}")
            click.echo(f"pending     {hub['dispatch_pending']} envelopes not yet durable")
            click.echo(f"spool       {hub['spool_messages']} envelopes")
            click.echo(f"broker      {'connected' if hub['broker_connected'] else 'unreachable'}")
            workers = hub.get("workers")
            if workers:
                waiting = workers["dead_letters_by_status"].get("dead", 0)
                click.echo(
                    f"workers     {workers['rows_stored']} rows stored, "
                    f"{workers['handler_runs']} handler runs, {workers['task_failures']} failures, "
                    f"{workers['dead_letters']} dead letters ({waiting} not dealt with), "
                    f"{workers['worker_starts']} worker starts, "
                    f"{workers['pool_process_starts']} pool process starts"
                )
        for name, depth in (data["queues"] or {}).items():
            click.echo(f"queue       {name:<20} {'-' if depth is None else depth}")
        for problem in problems:
            click.echo(f"hub: {problem}", err=True)
    if data["hub"] is None and data["queues"] is None:
        sys.exit(1)


@main.command(
    epilog="Examples:\n\n\b\n  hub demo\n  hub demo --duration 60 --devices 20 --rate 2\n"
    "  hub demo --duration 10 --json\n\n"
    "The hub listens on free ports of 127.0.0.1 and keeps its data in a temporary "
    "folder (removed afterwards) unless --data-dir is given; other settings "
    "(HUB_BROKER_URL, HUB_DATABASE_URL, ...) apply as for `hub run`. See docs/demo.md."
)
@click.option(
    "--duration",
    default=20.0,
    show_default=True,
    type=click.FloatRange(1, 3600),
    help="Seconds the devices send (waiting for command replies may add some).",
)
@click.option(
    "--devices",
    default=5,
    show_default=True,
    type=click.IntRange(1, 500),
    help="Simulated devices per transport.",
)
@click.option(
    "--rate",
    default=5.0,
    show_default=True,
    type=click.FloatRange(0.1, 1000),
    help="Telemetry messages per second per device.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the demo's data here (default: a temporary folder, removed afterwards).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON line.")
@click.pass_context
@friendly_errors
def demo(
    ctx: click.Context,
    duration: float,
    devices: int,
    rate: float,
    data_dir: Path | None,
    as_json: bool,
) -> None:
    """Run a hub and simulated TCP and MQTT devices, with a live view and a summary."""
    from hubapp.demo import DemoOptions
    from hubapp.demo import run as run_demo

    options = DemoOptions(duration, devices, rate, data_dir, as_json, bool(ctx.obj["verbose"]))
    sys.exit(run_demo(lambda overrides: _settings(ctx, **overrides), options))


if __name__ == "__main__":
    main()
