"""The options of a simulated fleet: one frozen object instead of long signatures.

Layer: firmware simulator; imports the hub core (`hub.protocol.base` for the
frame size limit) and the simulator's `faults` and `summary` only.

`FleetOptions` is what `firmware_sim.fleet.run_fleet` takes and what every
simulated device reads its settings from. Runtime objects (the stop event, the
shared counters, an acknowledgement hook) are not options: they are passed
next to it. Change one field of a copy with `dataclasses.replace`.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from firmware_sim.faults import Fault
from firmware_sim.summary import ProgressCallback
from hub.protocol.base import DEFAULT_MAX_FRAME_BYTES

__all__ = ["DEFAULT_ACK_TIMEOUT_S", "FleetOptions"]

# How long a connection may have messages outstanding without any ACK before
# the device assumes it is dead and reconnects, as real firmware would.
DEFAULT_ACK_TIMEOUT_S = 30.0


@dataclass(frozen=True, kw_only=True)
class FleetOptions:
    """How to run a fleet: where, which devices, how much, how fast.

    Each device sends `messages` telemetry messages (or sends for
    `duration_s`), `rate` per second (0: as fast as `window` and the ACKs
    allow). With `linger` it stays connected answering commands until the run
    is stopped or `duration_s` ends. `codec` and `max_frame_bytes` apply to
    TCP, `qos` and `topic_root` to MQTT. `fault`, when given, transforms every
    write a device makes (see `firmware_sim.faults`). With `tls`, devices (TCP,
    and MQTT on the broker's TLS port) connect over TLS, trusting `tls_ca_file`
    (else the system's CAs) and presenting `tls_cert_file` / `tls_key_file`
    when given.
    """

    transport: str
    host: str
    port: int
    #: (device id, credential) pairs.
    devices: Sequence[tuple[str, str]]
    messages: int | None = None
    duration_s: float | None = None
    rate: float = 0.0
    window: int = 64
    linger: bool = False
    #: New connections per second, fleet-wide; None (or 0): unlimited.
    connect_rate: float | None = None
    connect_timeout_s: float = 10.0
    drain_timeout_s: float = 30.0
    ack_timeout_s: float = DEFAULT_ACK_TIMEOUT_S
    #: A device stops (counting an error) after this long without progress; None: never.
    give_up_s: float | None = 60.0
    keepalive_s: float = 30.0
    codec: str = "native"
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    qos: int = 1
    topic_root: str = "devices"
    #: Lean MQTT only (`mqtt-lean`): subscribe to the command topic before counting as online.
    subscribe: bool = False
    fault: Fault | None = None
    tls: bool = False
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    progress: ProgressCallback | None = None
    progress_interval_s: float = 2.0

    def __post_init__(self) -> None:
        # A tuple, so that a caller's list changed later cannot change the options.
        object.__setattr__(self, "devices", tuple(self.devices))
        if self.window < 1:
            raise ValueError("window must be >= 1")
        if self.messages is not None and self.messages < 0:
            raise ValueError("messages must be >= 0")
        if self.rate < 0:
            raise ValueError("rate must be >= 0")
        if self.qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        if self.tls_key_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_key_file needs tls_cert_file")


@functools.cache
def client_ssl_context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext:
    """The client side of TLS (TCP and MQTT devices alike), made once per set of files."""
    # One context for every device of a fleet: loading the CA per connection
    # would cost more than the handshake it serves.
    context = ssl.create_default_context(cafile=ca_file)
    if cert_file is not None:
        context.load_cert_chain(cert_file, key_file)
    return context
