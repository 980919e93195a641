"""Health, status and Prometheus metrics over HTTP for the hub process.

Layer: bridges; imports the `hub` core and `bridges.listen` only.

A deliberately tiny HTTP/1.0 responder on asyncio (GET and HEAD): liveness
(`/healthz`, `/livez`: the event loop answers), readiness (`/readyz`: 503 with
the reasons while the hub spools or a listener is down, docs/operations in
docs/delivery.md "Health"), `/status` (JSON) and `/metrics` (Prometheus text).
It shares the event loop with the device listeners and does no blocking work.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bridges.listen import PortSetting, bind
from hub.metrics import Metrics

log = logging.getLogger(__name__)

_MAX_REQUEST_BYTES = 8192
_METHODS = ("GET", "HEAD")


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether the hub should be given devices now, and if not, why."""

    reasons: tuple[str, ...] = ()

    @property
    def ready(self) -> bool:
        return not self.reasons


class HttpStatusServer:
    def __init__(
        self,
        host: str,
        port: int,
        metrics: Metrics,
        status: Callable[[], dict[str, Any]],
        readiness: Callable[[], Readiness] = Readiness,
    ) -> None:
        self._host = host
        self._requested_port = port
        self._metrics = metrics
        self._status = status
        self._readiness = readiness
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        # asyncio.start_server's default backlog: a status endpoint needs no more.
        sock = await bind(
            self._host,
            self._requested_port,
            PortSetting("HTTP", "http_port", "HUB_HTTP_PORT"),
            backlog=100,
        )
        try:
            self._server = await asyncio.start_server(self._serve, sock=sock)
        except BaseException:
            sock.close()
            raise

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head_only = False
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
            if len(head) > _MAX_REQUEST_BYTES:
                raise ValueError("request too large")
            method, path, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            head_only = method == "HEAD"
            status, content_type, body = self._route(method, path.split("?", 1)[0])
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
            status, content_type, body = "400 Bad Request", "text/plain", b"bad request\n"
        except Exception:  # boundary: one request must not take the server down
            log.exception("status request failed")
            status, content_type, body = "500 Internal Server Error", "text/plain", b"error\n"
        allow = "Allow: GET, HEAD\r\n" if status.startswith("405") else ""
        # HEAD: the headers GET would send, Content-Length included, and no body.
        writer.write(
            f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n{allow}"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + (b"" if head_only else body)
        )
        try:
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _route(self, method: str, path: str) -> tuple[str, str, bytes]:
        if method not in _METHODS:
            return "405 Method Not Allowed", "text/plain", b"GET or HEAD only\n"
        if path in ("/healthz", "/livez"):
            # Liveness: the event loop answers. Not whether devices are served.
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            readiness = self._readiness()
            body = json.dumps({"ready": readiness.ready, "reasons": list(readiness.reasons)})
            status = "200 OK" if readiness.ready else "503 Service Unavailable"
            return status, "application/json", body.encode() + b"\n"
        if path == "/status":
            return "200 OK", "application/json", json.dumps(self._status()).encode()
        if path == "/metrics":
            return "200 OK", "text/plain; version=0.0.4", self._metrics.render()
        return "404 Not Found", "text/plain", b"not found\n"
