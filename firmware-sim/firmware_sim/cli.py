"""The `firmware-sim` command: run fleets of simulated devices against a hub.

Layer: firmware simulator; imports the hub core (settings, errors) and the
simulator's own modules only, never bridges or tasks.

`firmware-sim tcp` and `firmware-sim mqtt` run a fleet and print a summary
(one JSON line with `--json`); the exit status is 0 only if every message sent
was acknowledged, nothing was refused and nothing failed.
`firmware-sim provision` registers devices and saves their credentials.

Somewhat over 400 lines: a third of it is the commands' help text (epilogs and
option help), which belongs next to the options it documents.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from firmware_sim.faults import FAULT_HELP, Fault, parse_fault
from firmware_sim.fleet import (
    FleetOptions,
    FleetSummary,
    Progress,
    device_ids,
    format_progress,
    format_summary,
    run_fleet,
)
from firmware_sim.provision import (
    CredentialsFileError,
    load_credentials_file,
    provision_devices,
    redacted_url,
    save_credentials_file,
)
from hub.errors import HubError

F = TypeVar("F", bound=Callable[..., Any])

_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

_MAIN_EPILOG = """\b
Examples:
  # 100 TCP devices, registered first, 1000 messages each, as fast as acked
  firmware-sim tcp --devices 100 --messages 1000 --provision
\b
  # 1000 MQTT devices at one message per second each, for one minute
  firmware-sim mqtt --devices 1000 --rate 1 --duration 60 --provision
\b
  # register once, then reuse the credentials for many runs
  firmware-sim provision --devices 1000 --prefix bench- --out creds.json
  firmware-sim tcp --devices 1000 --prefix bench- --credentials-file creds.json \\
      --duration 30 --json

Provisioning writes to the hub's database: HUB_DATABASE_URL, HUB_DATA_DIR and
HUB_CONFIG (or --config) apply as for the hub itself.
"""

_TCP_EPILOG = """\b
Examples:
  firmware-sim tcp --devices 10 --messages 100 --provision
  firmware-sim tcp --port 7701 --codec lines --devices 5 --duration 20 \\
      --credential s3cret --prefix legacy-
  firmware-sim tcp --devices 2000 --connect-rate 200 --rate 2 --duration 120 \\
      --credentials-file creds.json --json
  firmware-sim tcp --port 7702 --tls --cafile ca.pem --devices 10 --messages 100 \\
      --provision

Devices are named <prefix>1 ... <prefix>N. Each sends HELLO, then telemetry
with seq counting up from 1, at most --window unacknowledged. On a dropped
connection it reconnects (backoff 0.2 s doubling to 5 s) and resends every
unacknowledged message with the same seq and boot id. Devices answer PING
and the commands ping, set_interval, fail and get_state.
"""

_MQTT_EPILOG = """\b
Examples:
  firmware-sim mqtt --devices 10 --messages 100 --provision
  firmware-sim mqtt --devices 1000 --rate 1 --duration 60 --qos 0 \\
      --credentials-file creds.json --json

Devices are named <prefix>1 ... <prefix>N and log in with their id as user
name and their credential as password. They publish to
devices/<id>/telemetry and answer commands from devices/<id>/commands on
devices/<id>/commands/<command id>/result. At QoS 1 a message counts as
acknowledged on its PUBACK; QoS 0 has no acknowledgement, so there a message
counts as acknowledged once written to the socket.

With --lean the devices are raw-socket publishers (hand-built CONNECT and
PUBLISH, PUBACKs read per packet id): a fraction of paho's CPU per message,
for load runs. They subscribe to nothing, so they answer no commands.
"""


@click.group(context_settings=_CONTEXT, epilog=_MAIN_EPILOG)
def main() -> None:
    """Simulated device fleets for load tests, benchmarks and demos of the hub.

    Runs many devices over the hub's TCP protocols or MQTT, counts what the
    hub acknowledged and prints a summary. Exits 0 only if every message sent
    was acknowledged, no device was refused and nothing failed.
    """


def _fleet_options(default_port: int, default_prefix: str) -> Callable[[F], F]:
    options = [
        click.option("--host", default="127.0.0.1", show_default=True, help="Hub address."),
        click.option("--port", type=click.IntRange(1, 65535), default=default_port,
                     show_default=True, help="Hub port."),
        click.option("--devices", "count", type=click.IntRange(min=1), default=1,
                     show_default=True, help="How many devices to simulate."),
        click.option("--messages", type=click.IntRange(min=0),
                     help="Telemetry messages per device (or give --duration)."),
        click.option("--duration", type=click.FloatRange(min=0, min_open=True),
                     help="Seconds to send for (or give --messages)."),
        click.option("--rate", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="Messages per second per device; 0 = as fast as the window allows."),
        click.option("--window", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Most unacknowledged messages per device."),
        click.option("--prefix", default=default_prefix, show_default=True,
                     help="Device id prefix: devices are <prefix>1 ... <prefix>N."),
        click.option("--provision", is_flag=True,
                     help="Register the devices in the hub's database first "
                     "(an existing one is re-registered with a new credential)."),
        click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
                     help="Hub configuration file for --provision (default: $HUB_CONFIG)."),
        click.option("--credential",
                     help="The credential of every device (registered elsewhere); "
                     "with --provision, register them with it."),
        click.option("--credentials-file",
                     type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="JSON object of device id -> credential."),
        click.option("--connect-rate", type=click.FloatRange(min=0, min_open=True),
                     help="New connections per second, fleet-wide  [default: unlimited]"),
        click.option("--drain-timeout", type=click.FloatRange(min=0), default=30.0,
                     show_default=True,
                     help="Seconds to wait for outstanding acknowledgements at the end."),
        click.option("--give-up", type=click.FloatRange(min=0, min_open=True), default=60.0,
                     show_default=True,
                     help="A device stops after this many seconds without progress "
                     "(hub down, nothing acknowledged)."),
        click.option("--fault", "fault_spec", metavar="NAME[:ARG]",
                     help="Inject a byte-level fault into everything the devices send, to "
                     f"test the hub: {FAULT_HELP}. With flip or drop the hub refuses or misses "
                     "messages, so such a run is expected to fail."),
        click.option("--json", "as_json", is_flag=True,
                     help="Print the summary as one JSON line on stdout."),
        click.option("--quiet", "-q", is_flag=True, help="No progress lines on stderr."),
        click.option("--verbose", "-v", is_flag=True,
                     help="Log each device's connects, refusals and errors on stderr."),
        click.option("--loop", "loop_kind", type=click.Choice(["auto", "asyncio", "uvloop"]),
                     default="auto", show_default=True,
                     help="Event loop; auto uses uvloop when it is installed."),
    ]  # fmt: skip

    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


@main.command(context_settings=_CONTEXT, epilog=_TCP_EPILOG)
@_fleet_options(default_port=7700, default_prefix="tcp-")
@click.option(
    "--codec",
    default="native",
    show_default=True,
    help="The listener's protocol: native or lines (or a plug-in codec).",
)
@click.option(
    "--tls", is_flag=True, help="Connect over TLS (a tcp_listeners entry with tls = true)."
)
@click.option(
    "--cafile",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="With --tls: trust this CA (PEM) instead of the system's.",
)
@click.option(
    "--cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="With --tls: present this client certificate (PEM).",
)
@click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --cert: its private key (PEM), if not in the --cert file.")  # fmt: skip
@click.pass_context
def tcp(
    ctx: click.Context,
    /,
    codec: str,
    tls: bool,
    cafile: Path | None,
    cert: Path | None,
    key: Path | None,
    **opts: Any,
) -> None:
    """Run devices over a hub TCP protocol (native binary frames or text lines)."""
    from hub.protocol.discovery import load_codec

    try:
        load_codec(codec)
    except HubError as exc:
        raise click.BadParameter(str(exc), param_hint="--codec") from None
    if not tls and (cafile or cert or key):
        raise click.BadParameter("needs --tls", param_hint="--cafile/--cert/--key")
    if key is not None and cert is None:
        raise click.BadParameter("needs --cert", param_hint="--key")
    tls_opts = {"tls": tls, "tls_ca_file": cafile, "tls_cert_file": cert, "tls_key_file": key}
    _run_fleet(ctx, "tcp", {"codec": codec, **tls_opts}, **opts)


@main.command(context_settings=_CONTEXT, epilog=_MQTT_EPILOG)
@_fleet_options(default_port=1883, default_prefix="mqtt-")
@click.option("--qos", type=click.IntRange(0, 1), default=1, show_default=True,
              help="QoS of telemetry; at 0, written counts as acknowledged.")  # fmt: skip
@click.option("--topic-root", default="devices", show_default=True,
              help="First topic level, as the hub's mqtt_topic_root.")  # fmt: skip
@click.option("--lean", is_flag=True,
              help="Raw-socket publishers for load runs: no paho, no command "
              "subscription (firmware_sim.lean_mqtt).")  # fmt: skip
@click.pass_context
def mqtt(ctx: click.Context, /, qos: int, topic_root: str, lean: bool, **opts: Any) -> None:
    """Run devices over MQTT against the hub's broker."""
    transport = "mqtt-lean" if lean else "mqtt"
    _run_fleet(ctx, transport, {"qos": qos, "topic_root": topic_root}, **opts)


@main.command(context_settings=_CONTEXT)
@click.option("--devices", "count", type=click.IntRange(min=1), default=1, show_default=True,
              help="How many devices to register.")  # fmt: skip
@click.option("--prefix", required=True,
              help="Device id prefix: devices are <prefix>1 ... <prefix>N (use the same "
              "--prefix when running them).")  # fmt: skip
@click.option("--credential", help="Register every device with this credential (default: random).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Hub configuration file (default: $HUB_CONFIG).")  # fmt: skip
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the credentials here (JSON, owner-only) instead of stdout.")  # fmt: skip
def provision(
    count: int, prefix: str, credential: str | None, config_file: Path | None, out: Path | None
) -> None:
    """Register devices in the hub's database and output their credentials as JSON.

    An existing device is re-registered with a new credential. Use the file
    with `firmware-sim tcp|mqtt --credentials-file`.
    """
    credentials = _provision(device_ids(prefix, count), credential, config_file, quiet=False)
    if out is None:
        import json

        click.echo(json.dumps(credentials, indent=1))
    else:
        save_credentials_file(out, credentials)
        click.echo(f"wrote {len(credentials)} credentials to {out}", err=True)


# ---------------------------------------------------------------------------


def _run_fleet(
    ctx: click.Context,
    transport: str,
    transport_opts: dict[str, Any],
    *,
    host: str,
    port: int,
    count: int,
    messages: int | None,
    duration: float | None,
    rate: float,
    window: int,
    prefix: str,
    provision: bool,
    config_file: Path | None,
    credential: str | None,
    credentials_file: Path | None,
    connect_rate: float | None,
    drain_timeout: float,
    give_up: float,
    fault_spec: str | None,
    as_json: bool,
    quiet: bool,
    verbose: bool,
    loop_kind: str,
) -> None:
    if (messages is None) == (duration is None):
        raise click.UsageError("give exactly one of --messages or --duration")
    fault: Fault | None = None
    if fault_spec is not None:
        try:
            fault = parse_fault(fault_spec)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--fault") from None
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    ids = device_ids(prefix, count)
    credentials = _credentials(
        ids,
        provision=provision,
        credential=credential,
        credentials_file=credentials_file,
        config_file=config_file,
        quiet=quiet,
    )
    devices = [(device_id, credentials[device_id]) for device_id in ids]
    progress = None if quiet else _print_progress
    options = FleetOptions(
        transport=transport,
        host=host,
        port=port,
        devices=devices,
        messages=messages,
        duration_s=duration,
        rate=rate,
        window=window,
        connect_rate=connect_rate,
        progress=progress,
        drain_timeout_s=drain_timeout,
        give_up_s=give_up,
        fault=fault,
        **transport_opts,
    )

    def start(stop: asyncio.Event) -> Coroutine[Any, Any, FleetSummary]:
        return run_fleet(options, stop=stop)

    if not quiet:
        what = f"{messages} messages" if messages is not None else f"{duration:g} s"
        click.echo(
            f"firmware-sim: {count} {transport} devices -> {host}:{port}, {what} each"
            + (f" at {rate:g}/s" if rate else "")
            + (f", fault {fault_spec}" if fault_spec else ""),
            err=True,
        )
    summary = _run_async(start, loop_kind=loop_kind, quiet=quiet)
    if as_json:
        click.echo(summary.to_json())
        if summary.refused_reasons:
            reasons = ", ".join(f"{k} x{v}" for k, v in sorted(summary.refused_reasons.items()))
            click.echo(f"firmware-sim: refused: {reasons}", err=True)
    else:
        click.echo(format_summary(summary))
    ctx.exit(0 if summary.ok else 1)


def _print_progress(progress: Progress) -> None:
    click.echo(format_progress(progress), err=True)


def _credentials(
    ids: list[str],
    *,
    provision: bool,
    credential: str | None,
    credentials_file: Path | None,
    config_file: Path | None,
    quiet: bool,
) -> dict[str, str]:
    if provision:
        return _provision(ids, credential, config_file, quiet=quiet)
    if credentials_file is not None:
        try:
            table = load_credentials_file(credentials_file)
        except CredentialsFileError as exc:
            raise click.BadParameter(str(exc), param_hint="--credentials-file") from None
        missing = [d for d in ids if d not in table]
        if missing and credential is None:
            raise click.UsageError(
                f"{len(missing)} of the devices have no credential in {credentials_file} "
                f"(the first: {missing[0]}); check --prefix and --devices, or give "
                "--credential for them, or --provision"
            )
        return {d: table[d] if d in table else str(credential) for d in ids}
    if credential is not None:
        return dict.fromkeys(ids, credential)
    raise click.UsageError(
        "the devices need credentials: give --provision (register them in the hub's "
        "database), --credential C (registered elsewhere) or --credentials-file F"
    )


def _provision(
    ids: list[str], credential: str | None, config_file: Path | None, *, quiet: bool
) -> dict[str, str]:
    from hub.settings import load_settings

    try:
        settings = load_settings(config_file)
        if not quiet:
            click.echo(
                f"firmware-sim: registering {len(ids)} devices in "
                f"{redacted_url(settings.effective_database_url)}",
                err=True,
            )

        def report(done: int, total: int) -> None:
            if not quiet and total >= 1000:
                click.echo(f"firmware-sim: registered {done}/{total}", err=True)

        return provision_devices(ids, credential=credential, settings=settings, progress=report)
    except HubError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:  # database errors: say which, without a traceback
        raise click.ClickException(f"provisioning failed: {type(exc).__name__}: {exc}") from None


T = TypeVar("T")


def _run_async(
    start: Callable[[asyncio.Event], Coroutine[Any, Any, T]], *, loop_kind: str, quiet: bool
) -> T:
    """Run the fleet; the first Ctrl-C (or SIGTERM) stops it gracefully, the second aborts."""

    async def body() -> T:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def interrupt() -> None:
            if stop.is_set():
                if task is not None:
                    task.cancel()
                return
            stop.set()
            if not quiet:
                click.echo(
                    "firmware-sim: stopping, waiting for outstanding acknowledgements "
                    "(interrupt again to abort)",
                    err=True,
                )

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, interrupt)
        return await start(stop)

    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop_kind != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop_kind == "uvloop":
                raise click.UsageError("--loop uvloop: uvloop is not installed") from None
        else:
            loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(body())
    except asyncio.CancelledError:
        raise click.Abort() from None
