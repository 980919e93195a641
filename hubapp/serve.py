"""`hub run`: one hub process until a stop signal, and what it prints.

Layer: composition root (`hubapp`); imports `hubapp.app` and the `hub` core.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import TextIO

from hub import __version__
from hub.settings import Settings
from hubapp.app import HubApp, running_loop_name

log = logging.getLogger(__name__)


def raise_open_file_limit() -> int | None:
    """Raise this process's soft limit of open descriptors to its hard limit.

    Every device connection holds one descriptor, and the common soft limit of
    1,024 is reached by a modest fleet (or by a peer opening silent sockets),
    after which no device and not even /healthz can connect. Returns the limit
    now in force, or None where the platform has no such limit.
    """
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        # macOS refuses RLIM_INFINITY as a soft limit: keep what there is.
        log.warning("could not raise the open file limit from %d to %s: %s", soft, hard, exc)
        return soft
    return hard


#: Each ends with the same clean stop.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: Reloads what can be reloaded (the MQTT ACL and password files, the TLS
#: files), keeping every connection.
RELOAD_SIGNAL = signal.SIGHUP


async def serve(
    settings: Settings, *, run_worker: bool | None = None, out: TextIO | None = None
) -> None:
    """Run a hub until SIGINT or SIGTERM; print where everything listens.

    A stop closes the listeners, makes every accepted message durable, and
    lets the in-hub worker finish its task (docs/delivery.md, "Stopping").
    SIGHUP reloads the MQTT ACL and password files and the TLS certificate,
    key, CA and CRL files, without dropping any connection.
    """
    out = out or sys.stdout
    open_files = raise_open_file_limit()
    wanted = settings.tcp_max_connections * len(settings.listeners)
    if settings.mqtt_enabled and not settings.mqtt_external_url:
        wanted += settings.mqtt_max_connections
    if open_files is not None and wanted >= open_files:
        log.warning(
            "tcp_max_connections (%d per listener) and mqtt_max_connections (%d) add up to "
            "more than the open file limit (%d): lower them, or raise the hard limit "
            "(ulimit -Hn, LimitNOFILE=)",
            settings.tcp_max_connections,
            settings.mqtt_max_connections,
            open_files,
        )
    app = HubApp(settings, run_worker=run_worker)
    await app.start()
    print(f"hub {__version__} running, mode: {app.mode()}", file=out)
    print(f"  loop         {running_loop_name()}", file=out)
    for listener in app.listeners():
        print(f"  {listener.name:<12} {listener.host}:{listener.port}  {listener.detail}", file=out)
    print(f"  data         {app.data_path}", file=out)
    print("Press Ctrl+C to stop.", file=out, flush=True)
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, app.stop_requested.set)
    loop.add_signal_handler(RELOAD_SIGNAL, app.reload)
    try:
        await app.stop_requested.wait()
    finally:
        print("stopping: making accepted messages durable...", file=out, flush=True)
        await app.stop()
        print("stopped", file=out, flush=True)
    if app.fatal is not None:
        raise app.fatal
