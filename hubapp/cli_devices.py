"""`hub devices`, `hub telemetry`, `hub state` and `hub send`: one device at a time.

Layer: composition root (`hubapp`); imports the `hub` core and `tasks` (to send
commands by name).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from hub.errors import HubError
from hubapp.cli_common import (
    audit_cli,
    emit_json,
    engine_from,
    friendly_errors,
    json_default,
    registry_from,
    settings_from,
)


@click.group()
def devices() -> None:
    """Register, list and remove devices."""


@devices.command("add")
@click.argument("device_id")
@click.option(
    "--cert-out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Also issue a certificate for mutual TLS into this folder (ID.crt, ID.key).",
)
@click.option(
    "--ca-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="The CA of --cert-out (`hub ca init`). Default: DATA_DIR/ca.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@friendly_errors
def devices_add(
    ctx: click.Context,
    device_id: str,
    cert_out: Path | None,
    ca_dir: Path | None,
    as_json: bool,
) -> None:
    """Register DEVICE_ID and print its new credential (shown only once)."""
    from hubapp import certificates
    from hubapp.cli_ca import default_ca_dir

    ca_dir = ca_dir or default_ca_dir(ctx)
    if cert_out is not None:
        certificates.check_ca(ca_dir)  # before the device is added: no device without its cert
    registry = registry_from(ctx, create=True)
    credential = registry.add(device_id)
    audit_cli(registry, "device.add", device_id)
    issued = None if cert_out is None else certificates.issue_device(ca_dir, device_id, cert_out)
    if as_json:
        shown: dict[str, str] = {"device_id": device_id, "credential": credential}
        if issued is not None:
            shown |= {"cert_file": str(issued.cert), "key_file": str(issued.key)}
        emit_json(shown)
        return
    click.echo(f"device {device_id} added; its credential (shown only once):")
    click.echo(credential)
    if issued is not None:
        click.echo(f"its certificate: {issued.cert}, key: {issued.key}")


@devices.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@friendly_errors
def devices_list(ctx: click.Context, as_json: bool) -> None:
    """List registered devices."""
    records = registry_from(ctx).devices()
    if as_json:
        emit_json([{"device_id": r.id, "created_at": r.created_at} for r in records])
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
    registry = registry_from(ctx)
    if not registry.remove(device_id):
        raise HubError(f"no device {device_id!r}")
    audit_cli(registry, "device.remove", device_id)
    click.echo(f"device {device_id} removed")


@click.command()
@click.argument("device_id")
@click.option("--last", default=10, show_default=True, help="How many messages.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@friendly_errors
def telemetry(ctx: click.Context, device_id: str, last: int, as_json: bool) -> None:
    """Show the newest telemetry stored for DEVICE_ID."""
    from hub.storage import recent_telemetry

    rows = recent_telemetry(engine_from(ctx), device_id, last)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo(f"no telemetry stored for {device_id}", err=True)
    for row in rows:
        values = json.dumps(row["payload"], separators=(",", ":"))
        click.echo(f"{row['received_at']:%Y-%m-%d %H:%M:%S.%f}  seq={row['seq']}  {values}")


@click.command()
@click.argument("device_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
@friendly_errors
def state(ctx: click.Context, device_id: str, as_json: bool) -> None:
    """Show DEVICE_ID's last known state and whether it is online."""
    from hub.storage import device_state

    row = device_state(engine_from(ctx), device_id)
    if row is None:
        raise HubError(f"nothing stored yet for device {device_id!r}")
    if as_json:
        emit_json(row)
        return
    click.echo(f"device      {device_id}")
    click.echo(f"online      {'yes' if row['online'] else 'no'} (via {row['transport']})")
    click.echo(f"last seen   {row['last_seen_at']}")
    click.echo(f"last values {json.dumps(row['last_values'])}")
    click.echo(f"state       {json.dumps(row['state'])}")


@click.command(
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

    settings = settings_from(ctx)
    engine_from(ctx).dispose()  # an existing database, at the newest schema
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
            emit_json({"command_id": result.id})
        else:
            click.echo(result.id)
        return
    try:
        reply = result.get(timeout=wait if wait is not None else ttl + 5)
    except CommandError as exc:
        if as_json:
            emit_json({"command_id": result.id, "ok": False, "error": str(exc)})
        raise HubError(str(exc)) from None
    except ResultTimeout:
        raise HubError(f"no reply within {wait} s (command {result.id} still pending)") from None
    if as_json:
        emit_json({"command_id": result.id, "ok": True, "result": reply})
    else:
        click.echo(json.dumps(reply, default=json_default))
