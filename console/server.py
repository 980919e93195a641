"""Running the console: `hub console` serves `create_app` with uvicorn.

Layer: console.
"""

from __future__ import annotations

import sys
from typing import Any

import uvicorn

from console.app import create_app
from hub.errors import ConfigError
from hub.settings import Settings
from hub.storage import migrate


def serve(settings: Settings, *, out: Any = None) -> None:
    """Serve the console on `host`:`console_port` until SIGINT or SIGTERM."""
    out = out or sys.stdout
    migrate(settings.effective_database_url)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.console_port,
        log_level=settings.log_level.lower(),
        access_log=False,
        proxy_headers=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    shown = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    print(
        f"console on http://{shown}:{settings.console_port}/  (API: /api, "
        "schema: /api/openapi.json)",
        file=out,
        flush=True,
    )
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind; say which setting to change
        raise ConfigError(
            f"the console could not listen on {settings.host}:{settings.console_port}; "
            "choose another port with console_port / HUB_CONSOLE_PORT",
            key="console_port",
            env="HUB_CONSOLE_PORT",
        ) from None
