"""`hub users` and `hub tokens`: the console's accounts, from the command line.

Layer: composition root (`hubapp`); imports the `hub` core only.
"""

from __future__ import annotations

import click

from hub.errors import HubError
from hubapp.cli_common import emit_json, engine_from, friendly_errors


def account_group(kind: str, secret_name: str) -> click.Group:
    """The `hub users` or `hub tokens` group: add, list, remove."""
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

        engine = engine_from(ctx)
        secret = (accounts.add_user if kind == "user" else accounts.add_token)(engine, name, role)
        audit.record(engine, "cli", f"{kind}.add", name, {"role": role})
        if as_json:
            emit_json({"name": name, "role": role, secret_name: secret})
        else:
            click.echo(f"{kind} {name} ({role}) added; its {secret_name} (shown only once):")
            click.echo(secret)

    @group.command("list", help=f"List console {plural}.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.pass_context
    @friendly_errors
    def list_(ctx: click.Context, as_json: bool) -> None:
        from hub import accounts

        engine = engine_from(ctx)
        found = accounts.users(engine) if kind == "user" else accounts.tokens(engine)
        if as_json:
            emit_json([{"name": a.name, "role": a.role, "created_at": a.created_at} for a in found])
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

        engine = engine_from(ctx)
        removed = (accounts.remove_user if kind == "user" else accounts.remove_token)(engine, name)
        if not removed:
            raise HubError(f"no {kind} {name!r}")
        audit.record(engine, "cli", f"{kind}.remove", name)
        click.echo(f"{kind} {name} removed")

    return group


users = account_group("user", "password")
tokens = account_group("token", "token")
