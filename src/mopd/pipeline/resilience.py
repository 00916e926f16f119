"""Per-route resilience: a circuit breaker, a retry budget and parked rows.

A teacher is *unavailable* when a scoring call fails after the HTTP client's
own retries with one of ``UNAVAILABLE_REASONS`` (connection refused or
broken, timeout, 429/503, other 5xx). Other failures (4xx, a malformed
response) are the request's fault and reject the row as before.

1. Retry budget. A group whose call failed is scored again in place while
   the route's budget has a token. Every successful call adds ``ratio`` of a
   token, up to ``capacity``, so retries stay a bounded fraction of the
   traffic during a storm of errors.
2. Circuit breaker. ``failure_threshold`` unavailable failures in a row open
   it. While it is open, no call goes to the teacher; after ``cooldown``
   seconds one probe row is let through (half-open). The probe's success
   closes the breaker; its failure opens it again with twice the cooldown,
   up to ``MAX_COOLDOWN_FACTOR`` times.
3. Parked rows. A row that cannot be scored now (the budget is spent, or the
   breaker is open) is parked. Its samples are dropped, because they would be
   stale by the time the teacher is back, and the row waits to be sampled
   again. The sampler takes a parked row back once its route's breaker lets
   it through. A row parked longer than ``dead_letter_seconds`` since its
   first park goes to the dead-letter file with the reason
   ``teacher_unavailable``.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum

from mopd.types import Row

UNAVAILABLE_REASONS = frozenset({"timeout", "connect_failed", "overloaded", "http_5xx"})
"""``BackendError`` reasons that mean the teacher is down or overloaded."""

MAX_COOLDOWN_FACTOR = 16
"""Largest multiple of the base cooldown between two probes of an open breaker."""


class BreakerState(IntEnum):
    """States of a circuit breaker, as exported by ``mopd_teacher_route_breaker_state``."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(frozen=True, slots=True)
class ResiliencePolicy:
    """Settings of the per-route breaker, retry budget and parking."""

    dead_letter_seconds: float
    """Seconds a row may wait for its teacher before it is dead-lettered."""
    failure_threshold: int = 3
    """Unavailable failures in a row that open the breaker."""
    cooldown_seconds: float = 5.0
    """Seconds an open breaker waits before its first probe."""
    retry_budget_ratio: float = 0.2
    """Tokens a successful call adds to the retry budget."""
    retry_budget_capacity: float = 10.0
    """Most tokens the retry budget holds; it starts full."""
    max_parked_rows: int = 10_000
    """Parked rows per route; a row parked beyond this is dead-lettered at once."""


@dataclass
class CircuitBreaker:
    """Closed, open or half-open, with one probe at a time."""

    failure_threshold: int
    cooldown_seconds: float
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    """Unavailable failures in a row."""
    opened_at: float = 0.0
    cooldown_factor: int = 1
    probe: tuple[str, int] | None = None
    """(row id, epoch) of the probe row while half-open."""

    def allows(self, row: Row, now: float) -> bool:
        """True when ``row`` may go to the teacher now; an open breaker past its cooldown makes it the probe."""
        if self.state is BreakerState.CLOSED:
            return True
        key = (row.row_id, row.epoch)
        if self.state is BreakerState.HALF_OPEN:
            return self.probe == key
        if now - self.opened_at >= self.cooldown_seconds * self.cooldown_factor:
            self.state = BreakerState.HALF_OPEN
            self.probe = key
            return True
        return False

    def ready_at(self) -> float:
        """Time at which an open breaker lets a probe through."""
        return self.opened_at + self.cooldown_seconds * self.cooldown_factor

    def record_success(self) -> bool:
        """Close the breaker; True when it was not closed before."""
        changed = self.state is not BreakerState.CLOSED
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.cooldown_factor = 1
        self.probe = None
        return changed

    def record_failure(self, now: float) -> bool:
        """Count an unavailable failure; True when this opens the breaker."""
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN:
            self.cooldown_factor = min(self.cooldown_factor * 2, MAX_COOLDOWN_FACTOR)
            self._open(now)
            return True
        if self.state is BreakerState.CLOSED and self.failures >= self.failure_threshold:
            self._open(now)
            return True
        return False

    def probe_abandoned(self, row: Row, now: float) -> None:
        """Reopen the breaker when the probe row left without a scoring result, so another probe goes later."""
        if self.state is BreakerState.HALF_OPEN and self.probe == (row.row_id, row.epoch):
            self._open(now)

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self.opened_at = now
        self.probe = None


@dataclass
class RetryBudget:
    """Token bucket of in-place retries: successes refill it, retries spend it."""

    ratio: float
    capacity: float
    tokens: float = field(default=-1.0)

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.capacity

    def deposit(self) -> None:
        self.tokens = min(self.capacity, self.tokens + self.ratio)

    def try_spend(self) -> bool:
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class ParkedRow:
    """A row waiting for its teacher."""

    row: Row
    since: float
    """Time of the row's first park; the dead-letter clock runs from here."""
    not_before: float
    """The row is not taken back before this time (a retry backoff)."""


@dataclass
class RouteParking:
    """Parked rows of one route, oldest first."""

    rows: deque[ParkedRow] = field(default_factory=deque)
    first_parked: dict[tuple[str, int], float] = field(default_factory=dict)
    """(row id, epoch) -> time of the first park, kept while the row is back in flight."""
