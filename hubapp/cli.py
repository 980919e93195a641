"""The `hub` command: run the hub, manage devices, read what they sent.

Layer: composition root (`hubapp`); imports anything. The command groups live in
`hubapp.cli_devices`, `hubapp.cli_accounts` and `hubapp.cli_dead_letters`;
what they share is in `hubapp.cli_common`.

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
from pathlib import Path
from typing import Any

import click

from hub import __version__
from hub.errors import ConfigError
from hubapp import cli_accounts, cli_ca, cli_dead_letters, cli_devices
from hubapp.cli_common import emit_json, friendly_errors, settings_from


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
    settings = settings_from(ctx, **options)
    try:
        from hubapp.serve import serve

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
    settings = settings_from(ctx, **options)
    from console.server import serve

    with contextlib.suppress(KeyboardInterrupt):
        serve(settings)


@main.command()
@click.option("--url", help="The hub's status URL (default: http://127.0.0.1:<http_port>/status).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@friendly_errors
def status(ctx: click.Context, url: str | None, as_json: bool) -> None:
    """Show the hub's listeners, connected devices and spool, and the queue depths."""
    from bridges.queues import queue_depths

    settings = settings_from(ctx)
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
            data["queues"] = queue_depths(settings)
        except Exception as exc:  # boundary: report an unreachable broker, do not crash
            problems.append(f"task broker unreachable: {exc}")
    if as_json:
        data["problems"] = problems
        emit_json(data)
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
    sys.exit(run_demo(lambda overrides: settings_from(ctx, **overrides), options))


main.add_command(cli_devices.devices)
main.add_command(cli_devices.telemetry)
main.add_command(cli_devices.state)
main.add_command(cli_devices.send)
main.add_command(cli_accounts.users)
main.add_command(cli_accounts.tokens)
main.add_command(cli_dead_letters.dead_letters_group)
main.add_command(cli_ca.ca)

if __name__ == "__main__":
    main()
