"""FastAPI dependencies: the console's context, the database, who is asking, and CSRF.

Layer: console; imports the `hub` core.

Authentication, in this order: `Authorization: Bearer <API token>`, else the
login cookie (a server-side session, hub/accounts.py). Requests that change
something with the cookie must carry the session's CSRF token, as the
`X-CSRF-Token` header (the pages' scripts) or a `csrf_token` form field (the
pages' forms); a bearer token needs none (a browser never sends it by itself).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, Request
from fastapi.templating import Jinja2Templates
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from console.events import EventHub
from console.throttle import LoginThrottle
from hub import accounts
from hub.accounts import LoginSession, Principal, Role
from hub.errors import HubError
from hub.settings import Settings

SESSION_COOKIE = "hub_console_session"
LOGIN_CSRF_COOKIE = "hub_console_login"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass
class Context:
    settings: Settings
    engine: Engine
    events: EventHub
    throttle: LoginThrottle
    templates: Jinja2Templates

    @property
    def session_lifetime(self) -> timedelta:
        return timedelta(hours=self.settings.console_session_hours)


class NotAuthenticated(HubError):
    """No valid token or login (HTTP 401; pages redirect to the login page)."""


class Forbidden(HubError):
    """Logged in, but the role does not allow it (HTTP 403)."""


class CsrfFailed(HubError):
    """A form post or script request without the session's CSRF token (HTTP 403)."""


def get_context(request: Request) -> Context:
    ctx: Context = request.app.state.ctx
    return ctx


def get_engine(ctx: Annotated[Context, Depends(get_context)]) -> Engine:
    return ctx.engine


def login_session(request: Request, engine: Engine) -> LoginSession | None:
    cookie = request.cookies.get(SESSION_COOKIE)
    return accounts.session_of(engine, cookie) if cookie else None


async def principal(request: Request, ctx: Annotated[Context, Depends(get_context)]) -> Principal:
    """Who is asking; NotAuthenticated when nobody valid is."""
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise NotAuthenticated("the Authorization header must be 'Bearer <token>'")
        found = await run_in_threadpool(accounts.token_principal, ctx.engine, token.strip())
        if found is None:
            raise NotAuthenticated("unknown or revoked API token")
        request.state.session = None
        return found
    session = await run_in_threadpool(login_session, request, ctx.engine)
    if session is None:
        raise NotAuthenticated("log in first, or send 'Authorization: Bearer <token>'")
    request.state.session = session
    if request.method not in SAFE_METHODS:
        await _check_csrf(request, session)
    return session.principal


async def _check_csrf(request: Request, session: LoginSession) -> None:
    sent = request.headers.get("x-csrf-token")
    if sent is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        form = await request.form()  # Starlette keeps it for the route's Form() fields
        value = form.get("csrf_token")
        sent = value if isinstance(value, str) else None
    if not sent or not hmac.compare_digest(sent, session.csrf_token):
        raise CsrfFailed(
            "missing or wrong CSRF token: the form is stale or was not sent by the console; "
            "reload the page"
        )


def require(role: Role) -> Callable[..., object]:
    """A dependency that admits principals whose role allows `role`."""

    async def check(who: Annotated[Principal, Depends(principal)]) -> Principal:
        if not who.may(role):
            raise Forbidden(f"this needs the {role} role; {who.label} is a {who.role}")
        return who

    return check


Viewer = Annotated[Principal, Depends(require("viewer"))]
Operator = Annotated[Principal, Depends(require("operator"))]
Admin = Annotated[Principal, Depends(require("admin"))]
Db = Annotated[Engine, Depends(get_engine)]
Ctx = Annotated[Context, Depends(get_context)]
