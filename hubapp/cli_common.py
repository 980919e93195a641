"""What the `hub` command's modules share: error handling, JSON output, settings
and the database.

Layer: composition root (`hubapp`); imports the `hub` core only.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import datetime
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import click

from hub.errors import ConfigError, HubError
from hub.settings import Settings, load_settings

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from hub.registry import Registry

F = TypeVar("F", bound=Callable[..., Any])


def json_default(value: Any) -> Any:
    """`json.dumps` default: datetimes as ISO 8601."""
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, default=json_default))


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


def settings_from(ctx: click.Context, **overrides: Any) -> Settings:
    return load_settings(ctx.obj.get("config"), **overrides)


def engine_from(ctx: click.Context, *, create: bool = False) -> Engine:
    """The hub's database, brought to the newest schema. Only a command that
    writes (`create`) may make a new one: a read command run in the wrong
    folder must not answer from an empty database it just created."""
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    from hub.storage import make_engine, migrate, sqlite_path

    settings = settings_from(ctx)
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


def registry_from(ctx: click.Context, *, create: bool = False) -> Registry:
    from hub.registry import Registry

    return Registry(engine_from(ctx, create=create))


def audit_cli(registry: Registry, action: str, device_id: str) -> None:
    """Changes made from the command line go into the console's audit log too."""
    from hub import audit

    audit.record(registry.engine, "cli", action, device_id)
