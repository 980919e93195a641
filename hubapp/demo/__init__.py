"""`hub demo`: a whole hub and a simulated fleet of both transports, with a live view.

Layer: composition root (`hubapp`). `hubapp.demo.orchestration` runs the hub,
the fleets, the commands and the sampler; `hubapp.demo.view` draws what they
show. This module only names what the `hub` command and the tests use.
"""

from hubapp.demo.orchestration import Demo, DemoOptions, demo_overrides, run
from hubapp.demo.view import (
    CommandOutcome,
    DeviceRow,
    Snapshot,
    TransportRow,
    render_frame,
    render_status_line,
    render_summary,
)

__all__ = [
    "CommandOutcome",
    "Demo",
    "DemoOptions",
    "DeviceRow",
    "Snapshot",
    "TransportRow",
    "demo_overrides",
    "render_frame",
    "render_status_line",
    "render_summary",
    "run",
]
