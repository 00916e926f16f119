"""Limits on concurrent student requests.

The sampler stage asks a controller for a slot before each student request
and reports how the request went when it releases the slot. ``FixedWindow``
keeps a constant window; ``AdaptiveWindow`` sizes the window from observed
latency and from the server's queue signals.

Backends report a per-request queue signal (for example a Fireworks-style
``prefill-queue-duration`` response header) with :func:`report_queue_signal`
from inside ``StudentSampler.sample``; the sampler stage reads it with
:func:`take_queue_signal` and passes it to ``release``. A polled gauge such as
vLLM's ``vllm:num_requests_waiting`` goes to
:meth:`AdaptiveWindow.observe_waiting_requests`.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import anyio
import structlog

from mopd.metrics import Metrics

if TYPE_CHECKING:
    from mopd.settings import Settings

log = structlog.get_logger(__name__)

Outcome = Literal["ok", "overload", "error"]
"""``overload``: 429/503 or a timeout, a sign that the server is saturated."""

Clock = Callable[[], float]

_queue_signal: ContextVar[float | None] = ContextVar("mopd_queue_signal", default=None)


def report_queue_signal(seconds: float) -> None:
    """Record the seconds the current request waited in the server's queue.

    Call it from a ``StudentSampler.sample`` implementation, in the task that
    runs the request; the sampler stage passes the value to ``release``.
    """
    _queue_signal.set(seconds)


def take_queue_signal() -> float | None:
    """Return and clear the queue signal reported in the current task, if any."""
    value = _queue_signal.get()
    if value is not None:
        _queue_signal.set(None)
    return value


def loop_clock() -> float:
    """Seconds on the running event loop's clock, or ``time.monotonic()`` outside a loop.

    The sampler measures latency on the same clock, so a controller under a
    virtual-time loop measures simulated seconds.
    """
    try:
        return asyncio.get_running_loop().time()
    except RuntimeError:
        return time.monotonic()


class ConcurrencyController(Protocol):
    """Admits student requests under a window of concurrent slots."""

    @property
    def window(self) -> int: ...

    @property
    def inflight(self) -> int: ...

    async def acquire(self) -> None:
        """Wait for a free slot."""
        ...

    def release(self, *, latency_seconds: float, outcome: Outcome, queue_signal: float | None = None) -> None:
        """Free a slot and report the request's latency, outcome and, when the
        server reported one, its queueing signal in seconds."""
        ...


class FixedWindow:
    """A constant window of concurrent requests."""

    def __init__(self, window: int, *, metrics: Metrics | None = None) -> None:
        if window < 1:
            raise ValueError(f"the concurrency window must be at least 1, got {window}")
        self._window = window
        # A semaphore, not a CapacityLimiter: the slot is released by the task
        # that ran the request, not the one that acquired it.
        self._slots = anyio.Semaphore(window)
        self._metrics = metrics
        self._inflight = 0
        if metrics is not None:
            metrics.student_window.set(window)

    @property
    def window(self) -> int:
        return self._window

    @property
    def inflight(self) -> int:
        return self._inflight

    async def acquire(self) -> None:
        await self._slots.acquire()
        self._inflight += 1
        if self._metrics is not None:
            self._metrics.student_inflight.set(self._inflight)

    def release(self, *, latency_seconds: float, outcome: Outcome, queue_signal: float | None = None) -> None:
        self._inflight -= 1
        self._slots.release()
        if self._metrics is not None:
            self._metrics.student_inflight.set(self._inflight)
            self._metrics.student_latency.observe(latency_seconds)


@dataclass(frozen=True, slots=True)
class AdaptiveConfig:
    """Tuning of :class:`AdaptiveWindow`. Ratios are latency over the uncongested baseline."""

    min_window: int = 1
    max_window: int = 256
    initial_window: int = 8
    grow_below_ratio: float = 1.2
    """Grow while the round's median latency stays under this ratio."""
    shrink_above_ratio: float = 1.4
    """Shrink when the round's median latency passes this ratio; hold in between."""
    max_shrink_factor: float = 0.5
    """Smallest factor one decrease may apply (also the factor applied on overload)."""
    min_shrink_factor: float = 0.9
    """Largest factor a latency decrease applies, so every decrease is a real cut."""
    queue_tolerance_seconds: float = 0.0
    """Server queueing above this (plus 10% of the baseline) counts as congestion."""
    baseline_window_seconds: float = 600.0
    """The baseline is the minimum latency over the last one to two of these periods."""
    min_round_samples: int = 4
    """Fewest completed requests that close a round."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_window <= self.initial_window <= self.max_window:
            raise ValueError(
                "the adaptive window needs 1 <= min_window <= initial_window <= max_window, got "
                f"min={self.min_window}, initial={self.initial_window}, max={self.max_window}"
            )
        if not 1.0 <= self.grow_below_ratio < self.shrink_above_ratio:
            raise ValueError(
                f"grow_below_ratio ({self.grow_below_ratio}) must be at least 1 and below shrink_above_ratio "
                f"({self.shrink_above_ratio})"
            )
        if not 0.0 < self.max_shrink_factor <= self.min_shrink_factor < 1.0:
            raise ValueError(
                f"shrink factors need 0 < max_shrink_factor ({self.max_shrink_factor}) <= min_shrink_factor "
                f"({self.min_shrink_factor}) < 1"
            )


# How AdaptiveWindow sizes the window
#
# The algorithm is AIMD driven by a latency ratio, in the spirit of TCP Vegas:
# the congestion signal is how far latency has risen above its uncongested
# baseline, not packet loss alone. A batching inference server serves requests
# at nearly constant latency until its batch is full. Past that point every
# extra request only adds latency (longer steps, then queueing) and no
# throughput. The best window is therefore the largest one whose latency stays
# near the baseline, and a latency ratio finds it directly. A gradient limiter
# (Netflix concurrency-limits, Envoy adaptive concurrency) uses the same
# signal; AIMD with a hold band was chosen because its steady state is easy to
# state and to test: the window settles where latency is between
# ``grow_below_ratio`` and ``shrink_above_ratio`` times the baseline.
#
# 1. Baseline: the minimum latency of successful requests over the last one to
#    two ``baseline_window_seconds`` (two rotating buckets), so it can rise when
#    requests get longer.
# 2. Rounds: a round closes after ``max(window, min_round_samples)`` successful
#    requests, about one round trip at full use. Its median latency over the
#    baseline is the ratio; its median server queue time is the queue signal.
# 3. Increase: below ``grow_below_ratio``, with no server queueing, and only if
#    the round used the whole window (a window the sampler cannot fill says
#    nothing about capacity), the window grows: by doubling until the first
#    decrease (slow start), then by one slot per round.
# 4. Decrease: above ``shrink_above_ratio`` or with server queueing, the window
#    is multiplied by ``grow_below_ratio / ratio`` clamped to
#    [max_shrink_factor, min_shrink_factor], which lands near the target in
#    one step. An ``overload`` outcome (429, 503, timeout) applies
#    ``max_shrink_factor`` at once, without waiting for the round.
# 5. Cooldown: after a decrease, further decreases wait until every request
#    that was in flight at the decrease has been released, so a burst of
#    failures from one round trip shrinks the window once.
# 6. Debt: a decrease takes effect at once. Requests already in flight above
#    the new window are carried as debt: their releases free no slot until
#    in-flight is below the window again.
#
# NOTE: under congestion that lasts longer than two baseline periods the
# minimum can creep up by the hold band, so a server that never reports queue
# signals may be driven up to ``shrink_above_ratio`` of the old baseline per
# period; server queue signals and overload outcomes still shrink the window.


class AdaptiveWindow:
    """A window of concurrent student requests sized by latency and server queue signals."""

    def __init__(
        self,
        config: AdaptiveConfig | None = None,
        *,
        metrics: Metrics | None = None,
        clock: Clock = loop_clock,
    ) -> None:
        self.config = config or AdaptiveConfig()
        self._clock = clock
        self._metrics = metrics
        self._window = float(self.config.initial_window)
        self._inflight = 0
        self._waiters: deque[anyio.Event] = deque()

        # Baseline latency: minimum over two rotating buckets.
        self._bucket_started = clock()
        self._bucket_min = math.inf
        self._previous_bucket_min = math.inf

        # The current round.
        self._round_latencies: list[float] = []
        self._round_queue: list[float] = []
        self._round_peak_inflight = 0

        self._slow_start = True
        self._cooldown_releases = 0
        self._server_waiting = 0
        self.events: deque[tuple[float, str, int, int]] = deque(maxlen=1024)
        """Recent adjustments as (clock seconds, reason, old window, new window)."""
        self._export()

    # --- interface ----------------------------------------------------------

    @property
    def window(self) -> int:
        return max(self.config.min_window, int(self._window))

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def debt(self) -> int:
        """Requests in flight above the window; their releases free no slot."""
        return max(0, self._inflight - self.window)

    @property
    def baseline_seconds(self) -> float | None:
        """Uncongested latency estimate, or None before the first success."""
        value = min(self._bucket_min, self._previous_bucket_min)
        return None if math.isinf(value) else value

    async def acquire(self) -> None:
        if self._inflight < self.window and not self._waiters:
            self._take_slot()
            return
        event = anyio.Event()
        self._waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                # The slot was handed over just as the wait was cancelled: give it back.
                self._inflight -= 1
                self._wake()
            else:
                self._waiters.remove(event)
            raise

    def release(self, *, latency_seconds: float, outcome: Outcome, queue_signal: float | None = None) -> None:
        self._inflight -= 1
        if self._metrics is not None:
            self._metrics.student_latency.observe(latency_seconds)
            if queue_signal is not None:
                self._metrics.student_queue_signal.observe(queue_signal)

        # A request that was in flight at the last decrease reports the old
        # load: it may neither shrink the window again nor join a round.
        if self._cooldown_releases > 0:
            self._cooldown_releases -= 1
            if outcome == "ok":
                self._update_baseline(latency_seconds)
        elif outcome == "overload":
            self._decrease(self.config.max_shrink_factor, reason="overload")
        elif outcome == "ok":
            self._observe(latency_seconds, queue_signal)
        self._wake()
        self._export()

    def observe_waiting_requests(self, waiting: int) -> None:
        """Record the server's count of queued requests, a polled gauge such as
        ``vllm:num_requests_waiting``. A positive count blocks growth and
        shrinks the window at the end of the round."""
        self._server_waiting = max(0, waiting)

    # --- internals ----------------------------------------------------------

    def _take_slot(self) -> None:
        self._inflight += 1
        self._round_peak_inflight = max(self._round_peak_inflight, self._inflight)
        if self._metrics is not None:
            self._metrics.student_inflight.set(self._inflight)

    def _wake(self) -> None:
        while self._waiters and self._inflight < self.window:
            self._take_slot()
            self._waiters.popleft().set()

    def _update_baseline(self, latency: float) -> None:
        now = self._clock()
        if now - self._bucket_started >= self.config.baseline_window_seconds:
            self._previous_bucket_min = self._bucket_min
            self._bucket_min = math.inf
            self._bucket_started = now
        self._bucket_min = min(self._bucket_min, latency)

    def _observe(self, latency: float, queue_signal: float | None) -> None:
        # 1. Baseline.
        self._update_baseline(latency)

        # 2. Round.
        self._round_latencies.append(latency)
        if queue_signal is not None:
            self._round_queue.append(queue_signal)
        if len(self._round_latencies) < max(self.window, self.config.min_round_samples):
            return
        baseline = self.baseline_seconds or latency
        ratio = _median(self._round_latencies) / baseline if baseline > 0 else 1.0
        queue = _median(self._round_queue) if self._round_queue else 0.0
        queued = queue > self.config.queue_tolerance_seconds + 0.1 * baseline or self._server_waiting > 0
        used_window = self._round_peak_inflight >= self.window
        self._round_latencies = []
        self._round_queue = []
        self._round_peak_inflight = self._inflight

        # 3. Decrease on a high ratio or server queueing, else 4. increase.
        if ratio > self.config.shrink_above_ratio or queued:
            factor = self.config.grow_below_ratio / max(ratio, self.config.shrink_above_ratio)
            factor = min(self.config.min_shrink_factor, max(self.config.max_shrink_factor, factor))
            self._decrease(factor, reason="queueing" if queued else "latency")
        elif ratio < self.config.grow_below_ratio and used_window:
            step = self._window if self._slow_start else 1.0
            self._set_window(self._window + step, reason="slow_start" if self._slow_start else "increase")

    def _decrease(self, factor: float, *, reason: str) -> None:
        self._slow_start = False
        self._set_window(self._window * factor, reason=reason)
        # The requests in flight now still report the old load; ignore their signals.
        self._cooldown_releases = self._inflight
        self._round_latencies = []
        self._round_queue = []

    def _set_window(self, value: float, *, reason: str) -> None:
        old = self.window
        self._window = min(float(self.config.max_window), max(float(self.config.min_window), value))
        new = self.window
        if new == old:
            return
        self.events.append((self._clock(), reason, old, new))
        direction = "increase" if new > old else "decrease"
        if self._metrics is not None:
            self._metrics.student_window_adjustments.labels(direction=direction, reason=reason).inc()
        log.debug("student_window_adjusted", reason=reason, old=old, new=new, inflight=self._inflight,
                  baseline_seconds=self.baseline_seconds)

    def _export(self) -> None:
        if self._metrics is None:
            return
        self._metrics.student_window.set(self.window)
        self._metrics.student_inflight.set(self._inflight)
        self._metrics.student_window_debt.set(self.debt)
        baseline = self.baseline_seconds
        if baseline is not None:
            self._metrics.student_baseline_latency.set(baseline)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def build_controller(settings: Settings, *, metrics: Metrics | None = None) -> FixedWindow | AdaptiveWindow:
    """Build the controller that ``MOPD_CONCURRENCY_MODE`` selects."""
    if settings.concurrency_mode == "fixed":
        return FixedWindow(settings.student_concurrency, metrics=metrics)
    config = AdaptiveConfig(
        min_window=settings.concurrency_min_window,
        max_window=settings.concurrency_max_window,
        initial_window=settings.concurrency_initial_window or settings.student_concurrency,
        grow_below_ratio=settings.concurrency_grow_below_ratio,
        shrink_above_ratio=settings.concurrency_shrink_above_ratio,
        queue_tolerance_seconds=settings.concurrency_queue_tolerance_seconds,
        baseline_window_seconds=settings.concurrency_baseline_window_seconds,
    )
    return AdaptiveWindow(config, metrics=metrics)
