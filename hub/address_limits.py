"""Limits per source address: connection rate, concurrent connections, failed logins.

Layer: hub core; pure bookkeeping, no sockets and no asyncio (every method
takes `now`, a monotonic time in seconds). Imports the standard library only.

The listeners (bridges/tcp.py, bridges/mqtt/listener.py) ask `admit` once per
accepted socket, before any work for it (no TLS handshake, no codec), call
`release` when an admitted socket closes, and `auth_failed` when a HELLO or
CONNECT from the address is refused for its credential
(docs/security.md, "Limits per source address"):

- connection attempts: a token bucket per address, `rate_per_s` tokens a
  second up to `burst`; an attempt with no token left is refused
  (`per_address_rate`);
- concurrent connections: at most `max_connections` open at once from one
  address (`per_address_connections`);
- failed authentications: after `auth_failures` refusals within
  `auth_window_s`, the address is refused at accept (`auth_backoff`) for a
  delay that doubles with each further failure, from `auth_backoff_s` up to
  `auth_backoff_max_s`.

A limit set to 0 is off. The table of addresses is bounded: it holds at most
`max_addresses` entries, least recently seen first out, so that a flood from
many (spoofed or IPv6) addresses cannot grow it. An address evicted while it
holds connections forgets them: its later `release` calls are ignored, and it
starts again from a full bucket (an undercount, never a refusal of a device).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

__all__ = [
    "AUTH_BACKOFF",
    "PER_ADDRESS_CONNECTIONS",
    "PER_ADDRESS_RATE",
    "AddressLimits",
    "AddressPolicy",
]

#: Refusal reasons, the `reason` label of hub_connections_refused_total.
PER_ADDRESS_RATE = "per_address_rate"
PER_ADDRESS_CONNECTIONS = "per_address_connections"
AUTH_BACKOFF = "auth_backoff"


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """The limits (hub.settings: `max_connects_per_address_per_s` and the rest)."""

    rate_per_s: float = 200.0
    burst: int = 400
    max_connections: int = 5000
    auth_failures: int = 10
    auth_window_s: float = 60.0
    auth_backoff_s: float = 1.0
    auth_backoff_max_s: float = 60.0
    max_addresses: int = 65536

    @property
    def active(self) -> bool:
        """False when every limit is off (the listeners then skip the table)."""
        return bool(self.rate_per_s or self.max_connections or self.auth_failures)


class _Entry:
    __slots__ = ("blocked_until", "failures", "failures_since", "open", "stamp", "tokens")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.stamp = now
        self.open = 0
        self.failures = 0
        self.failures_since = now
        self.blocked_until = 0.0


class AddressLimits:
    """The bookkeeping of one listener's source addresses; see the module docstring."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def open_connections(self, address: str) -> int:
        """Connections admitted from `address` and not yet released."""
        entry = self._entries.get(address)
        return 0 if entry is None else entry.open

    def admit(self, address: str, now: float) -> str | None:
        """Whether a new connection from `address` may proceed: None (admitted,
        and counted as open until `release`) or the reason it is refused."""
        policy = self.policy
        entries = self._entries
        entry = entries.get(address)
        if entry is None:
            entry = _Entry(float(policy.burst), now)
            entries[address] = entry
            if len(entries) > policy.max_addresses:
                entries.popitem(last=False)
        else:
            entries.move_to_end(address)
        if entry.blocked_until > now:
            return AUTH_BACKOFF
        if policy.rate_per_s:
            tokens = min(
                float(policy.burst), entry.tokens + (now - entry.stamp) * policy.rate_per_s
            )
            entry.stamp = now
            if tokens < 1.0:
                entry.tokens = tokens
                return PER_ADDRESS_RATE
            entry.tokens = tokens - 1.0
        if policy.max_connections and entry.open >= policy.max_connections:
            return PER_ADDRESS_CONNECTIONS
        entry.open += 1
        return None

    def release(self, address: str) -> None:
        """An admitted connection from `address` closed."""
        entry = self._entries.get(address)
        if entry is not None and entry.open > 0:
            entry.open -= 1

    def auth_failed(self, address: str, now: float) -> float:
        """Count a refused credential from `address`; the seconds the address
        is now refused at accept (0.0 while under `auth_failures`)."""
        policy = self.policy
        if not policy.auth_failures:
            return 0.0
        entry = self._entries.get(address)
        if entry is None:
            entry = _Entry(float(policy.burst), now)
            self._entries[address] = entry
            if len(self._entries) > policy.max_addresses:
                self._entries.popitem(last=False)
        if now - entry.failures_since > policy.auth_window_s:
            # A quiet window: the count starts again (but not a backoff in force).
            entry.failures = 0
            entry.failures_since = now
        entry.failures += 1
        beyond = entry.failures - policy.auth_failures
        if beyond < 0:
            return 0.0
        delay = min(policy.auth_backoff_max_s, policy.auth_backoff_s * 2.0 ** min(beyond, 32))
        entry.blocked_until = now + delay
        return delay
