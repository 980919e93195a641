"""`/api/events`: Server-Sent Events of presence changes, new telemetry and command results.

Layer: console.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from console.deps import Ctx, Viewer
from console.events import EventHub

router = APIRouter(prefix="/api/events", tags=["events"])

#: A comment line this often keeps proxies from closing an idle stream.
KEEPALIVE_S = 15.0


async def stream(request: Request, hub: EventHub) -> AsyncIterator[str]:
    queue = hub.subscribe()
    try:
        yield "retry: 2000\n\n"
        while not await request.is_disconnected():
            try:
                event = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            yield event.sse()
    finally:
        hub.unsubscribe(queue)


@router.get(
    "",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}}},
)
async def events(_: Viewer, ctx: Ctx, request: Request) -> StreamingResponse:
    """`event: presence` {device, online, hub, transport}; `event: telemetry` {device, at,
    values}; `event: command` {id, device, name, status}; `event: overflow` (reload)."""
    return StreamingResponse(
        stream(request, ctx.events),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
