"""Binding a listening socket, with a busy port as a clear configuration error.

Layer: bridges; imports the `hub` core only. Every listener of the hub (the
TCP codec ports, MQTT, the status endpoint) binds through `bind()`, so that
"port in use" always names the setting that chooses the port and never
surfaces as a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from dataclasses import dataclass

from hub.errors import ConfigError


@dataclass(frozen=True, slots=True)
class PortSetting:
    """What to tell a user whose port is busy: which listener, and which setting
    (file key and environment variable) moves it, plus an optional hint and
    an optional other way out."""

    what: str  # "MQTT", "TCP (native)", "HTTP status"
    key: str  # "mqtt_port"
    env: str  # "HUB_MQTT_PORT"
    hint: str = ""  # appended to the message, e.g. "(another broker such as Mosquitto?)"
    alternative: str = ""  # after the setting, e.g. "or bridge from that broker with ..."


async def bind(host: str, port: int, setting: PortSetting, *, backlog: int = 4096) -> socket.socket:
    """A non-blocking socket bound to `host`:`port` (0: a free port) and listening.

    A busy port or an address that cannot be used is a `ConfigError` naming
    the setting; the socket is closed on every failure.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot listen for {setting.what} on host {host!r}: {exc}", key="host", env="HUB_HOST"
        ) from None
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # Lets a restarted hub reuse the port while old connections linger in
        # TIME_WAIT; a port another process listens on still fails below.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            hint = f" {setting.hint}" if setting.hint else ""
            alternative = f", {setting.alternative}" if setting.alternative else ""
            raise ConfigError(
                f"{setting.what} port {port} on {host} is already in use{hint}; "
                f"choose another with {setting.key} / {setting.env}{alternative}",
                key=setting.key,
                env=setting.env,
            ) from None
        raise ConfigError(
            f"cannot listen for {setting.what} on {host}:{port}: {exc.strerror}",
            key="host",
            env="HUB_HOST",
        ) from None
    return sock
