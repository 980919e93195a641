"""hub.address_limits: token buckets, open connections and failed logins per address."""

from __future__ import annotations

from hub.address_limits import (
    AUTH_BACKOFF,
    PER_ADDRESS_CONNECTIONS,
    PER_ADDRESS_RATE,
    AddressLimits,
    AddressPolicy,
)


def test_a_burst_then_the_rate() -> None:
    limits = AddressLimits(AddressPolicy(rate_per_s=10, burst=5, max_connections=0))
    assert [limits.admit("a", 0.0) for _ in range(6)] == [None] * 5 + [PER_ADDRESS_RATE]
    assert limits.admit("a", 0.05) == PER_ADDRESS_RATE  # half a token
    assert limits.admit("a", 0.1) is None  # one token after 0.1 s at 10/s
    assert limits.admit("a", 0.1) == PER_ADDRESS_RATE
    # A long quiet time fills the bucket to its size, not beyond.
    assert [limits.admit("a", 100.0) for _ in range(6)] == [None] * 5 + [PER_ADDRESS_RATE]


def test_addresses_are_independent() -> None:
    limits = AddressLimits(AddressPolicy(rate_per_s=1, burst=1, max_connections=0))
    assert limits.admit("a", 0.0) is None
    assert limits.admit("a", 0.0) == PER_ADDRESS_RATE
    assert limits.admit("b", 0.0) is None


def test_open_connections_are_limited_and_released() -> None:
    limits = AddressLimits(AddressPolicy(rate_per_s=0, max_connections=2))
    assert limits.admit("a", 0.0) is None
    assert limits.admit("a", 0.0) is None
    assert limits.admit("a", 0.0) == PER_ADDRESS_CONNECTIONS
    assert limits.open_connections("a") == 2
    limits.release("a")
    assert limits.admit("a", 0.0) is None
    for _ in range(5):  # more releases than admissions never go below zero
        limits.release("a")
    assert limits.open_connections("a") == 0
    limits.release("never-seen")


def test_a_refused_rate_does_not_count_as_open() -> None:
    limits = AddressLimits(AddressPolicy(rate_per_s=1, burst=1, max_connections=1))
    assert limits.admit("a", 0.0) is None
    assert limits.admit("a", 0.0) == PER_ADDRESS_RATE
    assert limits.open_connections("a") == 1


def test_failed_logins_back_off_doubling_up_to_the_cap() -> None:
    policy = AddressPolicy(
        rate_per_s=0,
        max_connections=0,
        auth_failures=3,
        auth_window_s=60,
        auth_backoff_s=1,
        auth_backoff_max_s=4,
    )
    limits = AddressLimits(policy)
    assert [limits.auth_failed("a", 0.0) for _ in range(2)] == [0.0, 0.0]
    assert limits.auth_failed("a", 0.0) == 1.0
    assert limits.admit("a", 0.5) == AUTH_BACKOFF
    assert limits.admit("b", 0.5) is None
    assert limits.admit("a", 1.0) is None  # the delay has passed
    assert limits.auth_failed("a", 1.0) == 2.0
    assert limits.auth_failed("a", 3.0) == 4.0
    assert limits.auth_failed("a", 7.0) == 4.0  # capped
    assert limits.admit("a", 10.9) == AUTH_BACKOFF
    assert limits.admit("a", 11.0) is None


def test_failures_outside_the_window_start_again() -> None:
    limits = AddressLimits(AddressPolicy(auth_failures=2, auth_window_s=10))
    assert limits.auth_failed("a", 0.0) == 0.0
    assert limits.auth_failed("a", 11.0) == 0.0  # a new window
    assert limits.auth_failed("a", 12.0) > 0.0


def test_zero_turns_each_limit_off() -> None:
    policy = AddressPolicy(rate_per_s=0, max_connections=0, auth_failures=0)
    assert not policy.active
    limits = AddressLimits(policy)
    assert all(limits.admit("a", 0.0) is None for _ in range(10_000))
    assert limits.auth_failed("a", 0.0) == 0.0
    assert AddressPolicy().active


def test_the_table_is_bounded_least_recently_seen_first_out() -> None:
    limits = AddressLimits(AddressPolicy(rate_per_s=1, burst=1, max_addresses=100))
    for n in range(10_000):  # a flood from spoofed addresses
        limits.admit(f"10.0.{n // 256}.{n % 256}", 0.0)
        limits.auth_failed(f"10.1.{n // 256}.{n % 256}", 0.0)
    assert len(limits) == 100
    # A recently seen address is kept (its bucket is empty); evicted ones start full.
    assert limits.admit("10.1.39.15", 0.0) is None
    assert limits.admit("10.1.39.15", 0.0) == PER_ADDRESS_RATE
