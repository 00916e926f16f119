"""The adaptive student window, driven by hand on a simulated clock."""

from __future__ import annotations

import anyio
import pytest

from mopd.concurrency import AdaptiveConfig, AdaptiveWindow, FixedWindow, report_queue_signal, take_queue_signal
from mopd.metrics import Metrics

BASE = 0.5
"""Uncongested latency of the simulated server, in seconds."""


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_window(**overrides: object) -> tuple[AdaptiveWindow, FakeClock, Metrics]:
    clock = FakeClock()
    metrics = Metrics()
    config = AdaptiveConfig(**{"min_window": 2, "max_window": 64, "initial_window": 8, **overrides})
    return AdaptiveWindow(config, metrics=metrics, clock=clock), clock, metrics


async def run_round(window: AdaptiveWindow, clock: FakeClock, *, latency: float, outcome: str = "ok",
                    queue_signal: float | None = None, count: int | None = None) -> None:
    """Fill the window, then release every request with the same latency."""
    count = window.window if count is None else count
    for _ in range(count):
        await window.acquire()
    clock.now += latency
    for _ in range(count):
        window.release(latency_seconds=latency, outcome=outcome, queue_signal=queue_signal)


async def test_window_doubles_in_slow_start_at_baseline_latency() -> None:
    window, clock, _ = make_window()
    await run_round(window, clock, latency=BASE)
    assert window.window == 16
    await run_round(window, clock, latency=BASE)
    assert window.window == 32


async def test_window_grows_by_one_after_first_decrease() -> None:
    window, clock, _ = make_window()
    await run_round(window, clock, latency=BASE)
    await run_round(window, clock, latency=BASE * 2)
    shrunk = window.window
    await run_round(window, clock, latency=BASE)
    assert window.window == shrunk + 1


async def test_window_holds_inside_the_band() -> None:
    window, clock, _ = make_window()
    await run_round(window, clock, latency=BASE)
    await run_round(window, clock, latency=BASE * 1.3)
    assert window.window == 16


async def test_high_latency_shrinks_toward_target() -> None:
    window, clock, _ = make_window()
    await run_round(window, clock, latency=BASE)
    assert window.window == 16
    await run_round(window, clock, latency=BASE * 2.0)
    # factor = 1.2 / 2.0 = 0.6
    assert window.window == 9


async def test_unfilled_window_does_not_grow() -> None:
    window, clock, _ = make_window()
    await run_round(window, clock, latency=BASE, count=4)
    await run_round(window, clock, latency=BASE, count=4)
    assert window.window == 8


async def test_overload_shrinks_once_per_burst() -> None:
    window, clock, metrics = make_window()
    await run_round(window, clock, latency=BASE)
    assert window.window == 16
    await run_round(window, clock, latency=BASE, outcome="overload")
    assert window.window == 8
    decreases = metrics.value("mopd_student_concurrency_adjustments_total",
                              {"direction": "decrease", "reason": "overload"})
    assert decreases == 1


async def test_overload_after_cooldown_shrinks_again() -> None:
    window, clock, _ = make_window()
    await run_round(window, clock, latency=BASE)
    await run_round(window, clock, latency=BASE, outcome="overload")
    assert window.window == 8
    await run_round(window, clock, latency=BASE, outcome="overload", count=1)
    assert window.window == 4


async def test_shrink_when_full_carries_debt() -> None:
    window, clock, metrics = make_window(initial_window=8)
    for _ in range(8):
        await window.acquire()
    window.release(latency_seconds=BASE, outcome="overload")
    assert window.window == 4
    assert window.inflight == 7
    assert window.debt == 3
    assert metrics.value("mopd_student_concurrency_debt") == 3

    # Releases pay the debt before any waiter gets a slot.
    admitted = []

    async def wait_for_slot() -> None:
        await window.acquire()
        admitted.append(True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait_for_slot)
        await anyio.wait_all_tasks_blocked()
        for expected_inflight in (6, 5, 4):
            window.release(latency_seconds=BASE, outcome="ok")
            await anyio.wait_all_tasks_blocked()
            assert window.inflight == expected_inflight
            assert not admitted
        window.release(latency_seconds=BASE, outcome="ok")
    assert admitted == [True]
    assert window.inflight == 4


async def test_window_stays_within_bounds() -> None:
    window, clock, _ = make_window(min_window=2, max_window=20)
    for _ in range(5):
        await run_round(window, clock, latency=BASE)
    assert window.window == 20
    for _ in range(10):
        await run_round(window, clock, latency=BASE, outcome="overload", count=1)
    assert window.window == 2


async def test_queue_signal_shrinks_at_baseline_latency() -> None:
    window, clock, metrics = make_window()
    await run_round(window, clock, latency=BASE)
    await run_round(window, clock, latency=BASE, queue_signal=0.2)
    assert window.window < 16
    assert metrics.value("mopd_student_concurrency_adjustments_total",
                         {"direction": "decrease", "reason": "queueing"}) == 1


async def test_small_queue_signal_is_tolerated() -> None:
    window, clock, _ = make_window()
    await run_round(window, clock, latency=BASE, queue_signal=0.01)
    assert window.window == 16


async def test_waiting_requests_block_growth() -> None:
    window, clock, _ = make_window()
    window.observe_waiting_requests(3)
    await run_round(window, clock, latency=BASE)
    assert window.window < 8
    window.observe_waiting_requests(0)
    await run_round(window, clock, latency=BASE)
    assert window.window > 4


async def test_baseline_follows_a_slower_server_after_two_periods() -> None:
    window, clock, _ = make_window(baseline_window_seconds=10.0)
    await run_round(window, clock, latency=BASE)
    assert window.baseline_seconds == BASE
    clock.now += 25.0
    await run_round(window, clock, latency=BASE * 3, count=window.window)
    clock.now += 25.0
    await run_round(window, clock, latency=BASE * 3, count=window.window)
    assert window.baseline_seconds == BASE * 3


async def test_errors_do_not_move_the_window() -> None:
    window, clock, _ = make_window()
    await run_round(window, clock, latency=BASE * 5, outcome="error")
    assert window.window == 8


async def test_cancelled_waiter_leaves_no_slot_taken() -> None:
    window, _, _ = make_window(initial_window=2)
    await window.acquire()
    await window.acquire()
    with anyio.move_on_after(0.01):
        await window.acquire()
    window.release(latency_seconds=BASE, outcome="ok")
    assert window.inflight == 1
    await window.acquire()
    assert window.inflight == 2


async def test_queue_signal_reported_in_task_reaches_caller() -> None:
    async def backend_call() -> None:
        report_queue_signal(0.25)

    await backend_call()
    assert take_queue_signal() == 0.25
    assert take_queue_signal() is None


def test_invalid_adaptive_bounds_raise() -> None:
    with pytest.raises(ValueError, match="min_window"):
        AdaptiveConfig(min_window=10, initial_window=5, max_window=20)


def test_fixed_window_reports_its_size() -> None:
    metrics = Metrics()
    assert FixedWindow(5, metrics=metrics).window == 5
    assert metrics.value("mopd_student_concurrency_window") == 5
