"""The console's ASGI application: `create_app(settings)`.

Layer: console; imports the `hub` core and `tasks` (configured here to reach
the same broker and result backend as the hub).

Errors are JSON `{"detail": "..."}` with a status code under /api; pages turn
a missing login into a redirect to /login. Nothing answers without a login or
a token except /login, /healthz and the static files.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from console import actions, schemas
from console.deps import Context, CsrfFailed, Forbidden, NotAuthenticated
from console.events import EventHub
from console.routers import commands, dead_letters, devices, events, hubs, pages
from console.throttle import LoginThrottle
from hub import __version__
from hub.errors import HubError
from hub.settings import Settings
from hub.storage import make_engine

log = logging.getLogger(__name__)

HERE = Path(__file__).parent

_STATUS: list[tuple[type[HubError], int]] = [
    (NotAuthenticated, 401),
    (Forbidden, 403),
    (CsrfFailed, 403),
    (actions.NotFound, 404),
    (actions.Conflict, 409),
    (actions.InvalidInput, 422),
    (actions.Unavailable, 503),
]


def _is_api(request: Request) -> bool:
    return request.url.path.startswith("/api")


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(parts) or "invalid request"


def create_app(settings: Settings, *, poll_interval_s: float = 1.0) -> FastAPI:
    import tasks.application

    tasks.application.configure(settings)
    engine = make_engine(settings.effective_database_url)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    ctx = Context(
        settings=settings,
        engine=engine,
        events=EventHub(engine, poll_interval_s),
        throttle=LoginThrottle(),
        templates=templates,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await ctx.events.start()
        try:
            yield
        finally:
            await ctx.events.stop()
            engine.dispose()

    app = FastAPI(
        title="Hub console",
        version=__version__,
        description="The fleet's HTTP API: devices, telemetry, commands, dead letters, hubs. "
        "Authenticate with `Authorization: Bearer <token>` (`hub tokens add NAME --role ...`).",
        openapi_url="/api/openapi.json",
        docs_url="/api/docs",
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.ctx = ctx

    @app.exception_handler(HubError)
    async def hub_error(request: Request, exc: HubError) -> Response:
        code = next((c for kind, c in _STATUS if isinstance(exc, kind)), 400)
        if code == 401 and not _is_api(request):
            return RedirectResponse(f"/login?next={request.url.path}", status_code=303)
        if not _is_api(request) and code in (403, 404):
            return templates.TemplateResponse(
                request,
                "error.html",
                {"status": code, "message": str(exc), "who": None},
                status_code=code,
            )
        headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
        return JSONResponse({"detail": str(exc)}, status_code=code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        return JSONResponse({"detail": _validation_message(exc)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code)

    @app.get("/healthz", tags=["health"])
    def healthz() -> schemas.Health:
        """Unauthenticated liveness check."""
        return schemas.Health(status="ok")

    for router in (
        devices.router,
        commands.router,
        dead_letters.router,
        hubs.router,
        events.router,
        pages.router,
    ):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    return app
