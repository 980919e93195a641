"""The per-address limits of one listener, counted and logged (docs/security.md,
"Limits per source address").

Layer: bridges; imports the `hub` core only (`hub.address_limits`, `hub.metrics`,
`hub.settings`).

`AddressGate` puts `hub.address_limits.AddressLimits` on the clock, counts each
refusal in `hub_connections_refused_total{transport,reason}` and logs refusals
at most once per interval with their count, so that a flood cannot flood the
log. The accept path costs one dict lookup and some arithmetic.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter

from hub.address_limits import (
    AUTH_BACKOFF,
    PER_ADDRESS_CONNECTIONS,
    PER_ADDRESS_RATE,
    AddressLimits,
    AddressPolicy,
)
from hub.metrics import Metrics
from hub.settings import Settings

__all__ = ["AddressGate", "address_policy"]

log = logging.getLogger(__name__)

#: At most one log line per this many seconds about refusals per address.
_LOG_INTERVAL_S = 10.0

_SETTING = {
    PER_ADDRESS_RATE: "max_connects_per_address_per_s / HUB_MAX_CONNECTS_PER_ADDRESS_PER_S",
    PER_ADDRESS_CONNECTIONS: "max_connections_per_address / HUB_MAX_CONNECTIONS_PER_ADDRESS",
    AUTH_BACKOFF: "auth_failures_per_address / HUB_AUTH_FAILURES_PER_ADDRESS",
}


def address_policy(settings: Settings) -> AddressPolicy:
    """The limits per source address that `settings` set."""
    return AddressPolicy(
        rate_per_s=settings.max_connects_per_address_per_s,
        burst=settings.connect_burst_per_address,
        max_connections=settings.max_connections_per_address,
        auth_failures=settings.auth_failures_per_address,
        auth_window_s=settings.auth_failure_window_s,
        auth_backoff_s=settings.auth_backoff_s,
        auth_backoff_max_s=settings.auth_backoff_max_s,
    )


class AddressGate:
    """One listener's limits per source address, with their metrics and log."""

    def __init__(self, settings: Settings, metrics: Metrics, transport: str) -> None:
        self.limits = AddressLimits(address_policy(settings))
        self.active = self.limits.policy.active
        self._transport = transport
        self._refusals: dict[str, Counter] = {
            reason: metrics.connections_refused.labels(transport, reason) for reason in _SETTING
        }
        self._logged_at = -_LOG_INTERVAL_S
        self._unlogged: dict[str, int] = {}

    def admit(self, address: str) -> bool:
        """Whether a socket from `address` may proceed; a refusal is counted.
        An admitted socket must be `release`d when it closes."""
        reason = self.limits.admit(address, time.monotonic())
        if reason is None:
            return True
        self._refusals[reason].inc()
        self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_INTERVAL_S:
            for why, count in self._unlogged.items():
                log.warning(
                    "%s: %d connection(s) refused by %s (%s) since the last report; "
                    "the latest from %s",
                    self._transport.upper(),
                    count,
                    why,
                    _SETTING[why],
                    address,
                )
            self._logged_at = now
            self._unlogged = {}
        return False

    def release(self, address: str) -> None:
        self.limits.release(address)

    def auth_failed(self, address: str) -> None:
        """A credential from `address` was refused (the refusal is counted elsewhere)."""
        delay = self.limits.auth_failed(address, time.monotonic())
        if delay:
            log.info(
                "%s: %s refused at accept for %.0f s after repeated failed logins",
                self._transport.upper(),
                address,
                delay,
            )
