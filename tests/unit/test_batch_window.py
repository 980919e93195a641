"""The batch window policy (bridges/batch_window.py): pure, driven by a fake clock."""

from __future__ import annotations

import pytest

from bridges.batch_window import BatchWindow


def steady(window: BatchWindow, rate: float, seconds: float) -> tuple[float, float]:
    """Feed `rate` envelopes/s for `seconds`, opening a batch whenever the last
    window has passed; returns (the clock, the last window)."""
    now, last, pending = 0.0, 0.0, 0.0
    step = 1.0 / rate
    opened_at = -1.0
    while now < seconds:
        pending += 1
        if now >= opened_at + last:
            last = window.opened(now, int(pending))
            pending = 0
            opened_at = now
        now += step
    return now, last


def test_quiet_hub_hands_over_at_once() -> None:
    window = BatchWindow(target_messages=100, max_window_s=0.008)
    # the very first envelope: nothing known, no waiting
    assert window.opened(0.0, 1) == 0.0
    # one envelope a second: fewer than one more is expected within 8 ms
    _, last = steady(window, rate=1.0, seconds=10.0)
    assert last == 0.0
    _, last = steady(BatchWindow(100, 0.008), rate=50.0, seconds=5.0)
    assert last == 0.0


def test_moderate_load_waits_up_to_the_maximum() -> None:
    window = BatchWindow(target_messages=100, max_window_s=0.008)
    now, last = steady(window, rate=1000.0, seconds=2.0)
    # 100 envelopes would take 100 ms at 1,000/s: the budget caps the wait
    assert last == pytest.approx(0.008)
    assert window.rate(now) == pytest.approx(1000.0, rel=0.1)


def test_high_load_waits_for_the_target_only() -> None:
    window = BatchWindow(target_messages=100, max_window_s=0.008)
    _, last = steady(window, rate=50_000.0, seconds=1.0)
    # 100 envelopes arrive in 2 ms at 50,000/s
    assert last == pytest.approx(0.002, rel=0.1)
    assert last < 0.008


def test_rate_decays_when_the_load_stops() -> None:
    window = BatchWindow(target_messages=100, max_window_s=0.008, horizon_s=0.25)
    now, last = steady(window, rate=1000.0, seconds=2.0)
    assert last > 0
    # after two seconds of silence the next envelope is alone again
    assert window.opened(now + 2.0, 1) == 0.0


def test_zero_maximum_never_waits() -> None:
    window = BatchWindow(target_messages=100, max_window_s=0.0)
    _, last = steady(window, rate=5000.0, seconds=1.0)
    assert last == 0.0


def test_a_clock_that_steps_back_counts_as_no_time() -> None:
    window = BatchWindow(target_messages=10, max_window_s=0.01, horizon_s=0.25)
    window.opened(5.0, 1000)  # 1,000 recent arrivals: 4,000/s
    assert window.opened(4.0, 0) == pytest.approx(10 / 4000)
    assert window.rate(4.0) == pytest.approx(4000.0)


@pytest.mark.parametrize(
    ("target", "max_window", "horizon"), [(0, 0.01, 0.25), (10, -1.0, 0.25), (10, 0.01, 0.0)]
)
def test_bad_parameters_are_refused(target: int, max_window: float, horizon: float) -> None:
    with pytest.raises(ValueError):
        BatchWindow(target, max_window, horizon)
