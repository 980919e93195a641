"""`hub dead-letters`: what workers could not process, listed, shown, replayed or discarded.

Layer: composition root (`hubapp`); imports the `hub` core and `tasks` (to replay by name).
"""

from __future__ import annotations

import click

from hub.errors import HubError
from hubapp.cli_common import emit_json, engine_from, friendly_errors, settings_from


@click.group("dead-letters")
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

    rows = list_dead_letters(
        engine_from(ctx), status=None if status == "all" else status, limit=limit
    )
    if as_json:
        emit_json(rows)
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

    row = get_dead_letter(engine_from(ctx), letter_id)
    if as_json:
        emit_json(row)
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

    settings = settings_from(ctx)
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

    mark_discarded(engine_from(ctx), letter_id)
    click.echo(f"dead letter {letter_id} discarded")
