"""The console's web pages, rendered on the server (Jinja2), with small scripts for live parts.

Layer: console. Forms post here (with the session's CSRF token); the live
parts of a page (presence, charts, command replies) use the same /api as
automation does, and /api/events.

A little over 400 lines: one route per page of the console, each short; they
share the session, CSRF and template helpers defined here.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any
from urllib.parse import urlparse

from fastapi import APIRouter, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from console import actions
from console.deps import (
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    Admin,
    Ctx,
    Db,
    Operator,
    Viewer,
)
from hub import accounts, audit, dead_letters, fleet, hubs
from hub.accounts import ROLES, Principal

router = APIRouter(include_in_schema=False)

Field = Annotated[str, Form()]


def render(
    request: Request,
    ctx: Any,
    template: str,
    who: Principal | None,
    status_code: int = 200,
    **values: Any,
) -> HTMLResponse:
    session = getattr(request.state, "session", None)
    response: HTMLResponse = ctx.templates.TemplateResponse(
        request,
        template,
        {"who": who, "csrf": session.csrf_token if session else "", "roles": ROLES, **values},
        status_code=status_code,
    )
    return response


def _safe_next(target: str | None) -> str:
    # Only paths of this console: never an open redirect to another site.
    if not target or not target.startswith("/") or target.startswith("//"):
        return "/devices"
    return urlparse(target).path or "/devices"


# -- login and logout --------------------------------------------------------------


@router.get("/login")
def login_page(request: Request, ctx: Ctx, next: str | None = None) -> HTMLResponse:
    token = secrets.token_urlsafe(24)
    response = render(request, ctx, "login.html", None, login_csrf=token, next=_safe_next(next))
    response.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", max_age=3600)
    return response


@router.post("/login")
async def login(
    request: Request,
    ctx: Ctx,
    username: Field,
    password: Field,
    csrf_token: Field,
    next: Annotated[str, Form()] = "/devices",
) -> Response:
    address = request.client.host if request.client else "?"
    keys = (f"user:{username}", f"addr:{address}")

    def again(message: str, code: int) -> HTMLResponse:
        token = secrets.token_urlsafe(24)
        page = render(
            request,
            ctx,
            "login.html",
            None,
            status_code=code,
            login_csrf=token,
            next=_safe_next(next),
            error=message,
            username=username,
        )
        page.set_cookie(LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", max_age=3600)
        return page

    cookie = request.cookies.get(LOGIN_CSRF_COOKIE)
    if not cookie or not secrets.compare_digest(cookie, csrf_token):
        return again("The login form had expired; please try again.", 403)
    wait = ctx.throttle.wait_s(*keys)
    if wait > 0:
        return again(f"Too many failed logins; try again in {wait:.0f} s.", 429)
    who = await run_in_threadpool(accounts.check_password, ctx.engine, username, password)
    if who is None:
        ctx.throttle.failed(*keys)
        return again("Wrong user name or password.", 401)
    ctx.throttle.succeeded(*keys)
    session_id, _ = await run_in_threadpool(
        accounts.start_session, ctx.engine, who, ctx.session_lifetime
    )
    response = RedirectResponse(_safe_next(next), status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
        max_age=int(ctx.session_lifetime.total_seconds()),
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE)
    return response


@router.post("/logout")
def logout(request: Request, _: Viewer, engine: Db) -> Response:
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        accounts.end_session(engine, cookie)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


# -- devices -------------------------------------------------------------------------


@router.get("/")
def home(_: Viewer) -> Response:
    return RedirectResponse("/devices", status_code=303)


@router.get("/devices")
def devices_page(
    request: Request, who: Viewer, ctx: Ctx, q: str = "", online: str = "", page: int = 0
) -> HTMLResponse:
    presence = {"yes": True, "no": False}.get(online)
    limit = 50
    found = fleet.list_devices(
        ctx.engine, online=presence, prefix=q, offset=max(page, 0) * limit, limit=limit
    )
    return render(
        request,
        ctx,
        "devices.html",
        who,
        nav="devices",
        page=found,
        q=q,
        online=online,
        page_number=max(page, 0),
    )


@router.get("/devices/{device_id}")
def device_page(request: Request, who: Viewer, ctx: Ctx, device_id: str) -> HTMLResponse:
    found = fleet.get_device(ctx.engine, device_id)
    if found is None:
        raise actions.NotFound(f"no device {device_id!r}")
    commands = fleet.recent_commands(ctx.engine, device_id)
    numeric = sorted(
        k
        for k, v in found.last_values.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    )
    return render(
        request,
        ctx,
        "device.html",
        who,
        nav="devices",
        device=found,
        commands=commands,
        numeric=numeric,
    )


# -- provisioning (admin) --------------------------------------------------------------


@router.get("/provisioning")
def provisioning_page(request: Request, who: Admin, ctx: Ctx) -> HTMLResponse:
    return render(request, ctx, "provisioning.html", who, nav="provisioning")


def _provisioned(
    request: Request,
    ctx: Any,
    who: Principal,
    *,
    error: str | None = None,
    created: list[tuple[str, str]] | None = None,
    notice: str | None = None,
    errors: list[str] | None = None,
) -> HTMLResponse:
    return render(
        request,
        ctx,
        "provisioning.html",
        who,
        nav="provisioning",
        status_code=422 if error else 200,
        error=error,
        created=created or [],
        notice=notice,
        errors=errors or [],
    )


@router.post("/provisioning/add")
def provision_add(request: Request, who: Admin, ctx: Ctx, device_id: Field) -> HTMLResponse:
    try:
        credential = actions.add_device(ctx.engine, who, device_id.strip())
    except (actions.InvalidInput, actions.Conflict) as exc:
        return _provisioned(request, ctx, who, error=str(exc))
    return _provisioned(
        request,
        ctx,
        who,
        created=[(device_id.strip(), credential)],
        notice=f"Device {device_id.strip()} added.",
    )


@router.post("/provisioning/import")
async def provision_import(request: Request, who: Admin, ctx: Ctx, file: UploadFile) -> Response:
    text = (await file.read()).decode("utf-8", errors="replace")
    try:
        result = await run_in_threadpool(actions.import_devices, ctx.engine, who, text)
    except actions.InvalidInput as exc:
        return _provisioned(request, ctx, who, error=str(exc))
    return _provisioned(
        request,
        ctx,
        who,
        created=result.created,
        errors=result.errors,
        notice=f"{len(result.created)} devices imported.",
    )


@router.post("/provisioning/rekey")
def provision_rekey(request: Request, who: Admin, ctx: Ctx, device_id: Field) -> HTMLResponse:
    try:
        credential = actions.rekey_device(ctx.engine, who, device_id.strip())
    except actions.NotFound as exc:
        return _provisioned(request, ctx, who, error=str(exc))
    return _provisioned(
        request,
        ctx,
        who,
        created=[(device_id.strip(), credential)],
        notice=f"Device {device_id.strip()} has a new credential; the old one no longer works.",
    )


@router.post("/provisioning/remove")
def provision_remove(request: Request, who: Admin, ctx: Ctx, device_id: Field) -> HTMLResponse:
    try:
        actions.remove_device(ctx.engine, who, device_id.strip())
    except actions.NotFound as exc:
        return _provisioned(request, ctx, who, error=str(exc))
    return _provisioned(request, ctx, who, notice=f"Device {device_id.strip()} removed.")


# -- dead letters ----------------------------------------------------------------------


@router.get("/dead-letters")
def dead_letters_page(
    request: Request, who: Viewer, ctx: Ctx, status: str = "dead"
) -> HTMLResponse:
    shown = status if status in (*dead_letters.STATUSES, "all") else "dead"
    rows = dead_letters.list_dead_letters(
        ctx.engine, status=None if shown == "all" else shown, limit=200
    )
    return render(
        request,
        ctx,
        "dead_letters.html",
        who,
        nav="dead-letters",
        letters=rows,
        counts=dead_letters.count_dead_letters(ctx.engine),
        status=shown,
        notice=request.query_params.get("notice"),
    )


@router.get("/dead-letters/{letter_id}")
def dead_letter_page(request: Request, who: Viewer, ctx: Ctx, letter_id: str) -> HTMLResponse:
    return render(
        request,
        ctx,
        "dead_letter.html",
        who,
        nav="dead-letters",
        letter=actions.dead_letter(ctx.engine, letter_id),
    )


@router.post("/dead-letters/{letter_id}/replay")
def dead_letter_replay(request: Request, who: Operator, ctx: Ctx, letter_id: str) -> Response:
    try:
        actions.replay_dead_letter(ctx.engine, who, letter_id)
    except (actions.Conflict, actions.Unavailable) as exc:
        return _back_to_letters(str(exc))
    return _back_to_letters(f"Dead letter {letter_id[:8]} replayed.")


@router.post("/dead-letters/{letter_id}/discard")
def dead_letter_discard(request: Request, who: Operator, ctx: Ctx, letter_id: str) -> Response:
    try:
        actions.discard_dead_letter(ctx.engine, who, letter_id)
    except actions.Conflict as exc:
        return _back_to_letters(str(exc))
    return _back_to_letters(f"Dead letter {letter_id[:8]} discarded.")


def _back_to_letters(notice: str) -> Response:
    from urllib.parse import quote

    return RedirectResponse(f"/dead-letters?notice={quote(notice)}", status_code=303)


# -- hubs ------------------------------------------------------------------------------


@router.get("/hubs")
def hubs_page(request: Request, who: Viewer, ctx: Ctx) -> HTMLResponse:
    return render(request, ctx, "hubs.html", who, nav="hubs", hubs=hubs.hubs(ctx.engine))


# -- users, tokens, audit (admin) ----------------------------------------------------------


def _accounts_page(
    request: Request,
    ctx: Any,
    who: Principal,
    kind: str,
    *,
    secret: tuple[str, str] | None = None,
    error: str | None = None,
    notice: str | None = None,
) -> HTMLResponse:
    listing = accounts.users(ctx.engine) if kind == "user" else accounts.tokens(ctx.engine)
    return render(
        request,
        ctx,
        "accounts.html",
        who,
        nav=f"{kind}s",
        kind=kind,
        accounts=listing,
        secret=secret,
        error=error,
        notice=notice,
        status_code=422 if error else 200,
    )


@router.get("/users")
def users_page(request: Request, who: Admin, ctx: Ctx) -> HTMLResponse:
    return _accounts_page(request, ctx, who, "user")


@router.get("/tokens")
def tokens_page(request: Request, who: Admin, ctx: Ctx) -> HTMLResponse:
    return _accounts_page(request, ctx, who, "token")


@router.post("/{kind}s/add")
def account_add(
    request: Request, who: Admin, ctx: Ctx, kind: str, name: Field, role: Field
) -> HTMLResponse:
    kind = _account_kind(kind)
    try:
        secret = actions.add_account(ctx.engine, who, kind, name.strip(), role)
    except (actions.InvalidInput, actions.Conflict) as exc:
        return _accounts_page(request, ctx, who, kind, error=str(exc))
    return _accounts_page(request, ctx, who, kind, secret=(name.strip(), secret))


@router.post("/{kind}s/remove")
def account_remove(request: Request, who: Admin, ctx: Ctx, kind: str, name: Field) -> HTMLResponse:
    kind = _account_kind(kind)
    try:
        actions.remove_account(ctx.engine, who, kind, name)
    except actions.NotFound as exc:
        return _accounts_page(request, ctx, who, kind, error=str(exc))
    return _accounts_page(request, ctx, who, kind, notice=f"{kind.title()} {name} removed.")


def _account_kind(kind: str) -> str:
    if kind not in ("user", "token"):
        raise actions.NotFound(f"no page /{kind}s")
    return kind


@router.get("/audit")
def audit_page(request: Request, who: Admin, ctx: Ctx) -> HTMLResponse:
    return render(request, ctx, "audit.html", who, nav="audit", entries=audit.recent(ctx.engine))
