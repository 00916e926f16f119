"""Stage 3: route each group to its teacher's pool and score it there.

Route isolation rests on three parts:

1. Credits. Every route has ``route_queue_size + workers`` credits. The
   sampler takes one before it samples a row and the route's pool gives it
   back once the group leaves the pool. So a route never has more groups than
   its queue and workers can take, and the dispatcher's send to a route queue
   waits at most until an idle worker of that route takes a group.
2. Stall detection. A scoring call that runs longer than ``stall_seconds``
   is cancelled, its samples fail as ``teacher_stalled`` and the route is
   marked stalled. While it is stalled, groups sampled before the stall fail
   at once, new rows of that route go to the rejects file as
   ``route_stalled`` (with source and line, so they can be replayed) and a
   probe row is let through after ``stall_seconds``, then after twice that
   for each probe that also stalled, up to ``MAX_PROBE_BACKOFF`` times; the
   first scoring call that gets an answer clears the mark.
3. Failed groups release their admission at the policy gate (as any failed
   group does), so a stalled route cannot hold a strict on-policy step.
4. With a :class:`~mopd.pipeline.resilience.ResiliencePolicy`, a teacher that
   fails as unavailable (refused connections, timeouts, 5xx after the HTTP
   client's retries) does not reject rows: a retry budget, a circuit breaker
   and parked rows bound the wait, and rows that wait too long go to the
   dead-letter file (see ``resilience.py``).

NOTE: a probe row counts against the policy gate like any row, so in strict
on-policy mode a probe that stalls delays its step by up to
``stall_seconds``; the backoff bounds how often that happens.

NOTE: rows arrive in one ordered stream and memory is bounded, so a route
that is slow but still answering back-pressures the whole input once its
credits are used up; only a route that stops answering is cut off.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import anyio
import structlog
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from mopd.backends.base import ScoredCompletion, TeacherScorer
from mopd.concurrency import Clock, loop_clock
from mopd.errors import BackendError
from mopd.metrics import Metrics
from mopd.pipeline.gate import StepGate
from mopd.pipeline.reader import RejectsFile
from mopd.pipeline.resilience import (
    UNAVAILABLE_REASONS,
    BreakerState,
    CircuitBreaker,
    ParkedRow,
    ResiliencePolicy,
    RetryBudget,
    RouteParking,
)
from mopd.tokenization import PromptRenderer
from mopd.types import Row, SampledGroup, ScoredGroup

log = structlog.get_logger(__name__)

MAX_PROBE_BACKOFF = 16
"""Largest multiple of ``stall_seconds`` between two probes of a stalled route."""

EXPIRY_SCAN_SECONDS = 0.2
"""Minimum seconds between two scans of the parked rows for ones past the dead-letter time."""


@dataclass
class _RouteState:
    capacity: int
    in_use: int = 0
    stalled_since: float | None = None
    last_probe: float = float("-inf")
    failed_probes: int = 0
    probe: tuple[str, int] | None = None
    """(row id, epoch) of the probe row in flight while stalled."""
    changed: anyio.Event = field(default_factory=anyio.Event)
    breaker: CircuitBreaker | None = None
    budget: RetryBudget | None = None
    parking: RouteParking = field(default_factory=RouteParking)


class RouteAdmission:
    """Per-route credits and stall marks, shared by the sampler and the route pools.

    :param capacity_by_route: credits per route, at least 1 each.
    :param stall_seconds: a scoring call longer than this marks its route
        stalled; None never marks a route stalled.
    :param resilience: breaker, retry budget and parking of unavailable
        teachers; None rejects the rows of a failing teacher at once.
    """

    def __init__(
        self,
        capacity_by_route: Mapping[str, int],
        *,
        stall_seconds: float | None,
        metrics: Metrics,
        clock: Clock = loop_clock,
        resilience: ResiliencePolicy | None = None,
    ) -> None:
        for route, capacity in capacity_by_route.items():
            if capacity < 1:
                raise ValueError(f"route {route!r} needs at least 1 admission credit, got {capacity}")
        self._routes = {route: _RouteState(capacity=capacity) for route, capacity in capacity_by_route.items()}
        self.stall_seconds = stall_seconds
        self._clock = clock
        # Labelled children are looked up once: the sampler hot path touches them per row.
        self._credits_gauges = {route: metrics.route_credits.labels(route=route) for route in self._routes}
        self._stalled_gauges = {route: metrics.route_stalled.labels(route=route) for route in self._routes}
        self.resilience = resilience
        self._metrics = metrics
        self._last_expiry_scan = float("-inf")
        if resilience is not None:
            for state in self._routes.values():
                state.breaker = CircuitBreaker(failure_threshold=resilience.failure_threshold,
                                               cooldown_seconds=resilience.cooldown_seconds)
                state.budget = RetryBudget(ratio=resilience.retry_budget_ratio,
                                           capacity=resilience.retry_budget_capacity)
        for route in self._routes:
            self._export(route)
            self._export_stalled(route)
            self._export_parking(route)

    def credits(self, route: str) -> int:
        """Free credits of ``route``."""
        state = self._routes[route]
        return state.capacity - state.in_use

    def is_stalled(self, route: str) -> bool:
        return self._routes[route].stalled_since is not None

    async def admit(self, row: Row) -> bool:
        """Wait for a credit of the row's route; False when the route is stalled.

        A stalled route admits one probe row per ``stall_seconds``.
        """
        state = self._routes[row.route]
        while True:
            if state.stalled_since is not None:
                now = self._clock()
                backoff = min(2**state.failed_probes, MAX_PROBE_BACKOFF)
                due = self.stall_seconds is None or now - state.last_probe >= self.stall_seconds * backoff
                if state.probe is None and due and state.in_use < state.capacity:
                    state.probe = (row.row_id, row.epoch)
                    state.last_probe = now
                    self._take(row.route, state)
                    log.info("route_probe_admitted", route=row.route, row_id=row.row_id)
                    return True
                return False
            if state.in_use < state.capacity:
                self._take(row.route, state)
                return True
            await state.changed.wait()

    def release(self, row: Row) -> None:
        """Give back the credit the row took; its group has left the route."""
        state = self._routes[row.route]
        state.in_use -= 1
        if state.probe == (row.row_id, row.epoch):
            state.probe = None
        self.abandon_probe(row)
        state.parking.first_parked.pop((row.row_id, row.epoch), None)
        self._notify(row.route, state)

    # --- unavailable teachers: breaker, retry budget, parked rows -----------------

    def passes_breaker(self, row: Row) -> bool:
        """True when the row's route breaker lets it go to the teacher (always without a resilience policy)."""
        breaker = self._routes[row.route].breaker
        if breaker is None:
            return True
        allowed = breaker.allows(row, self._clock())
        self._export_parking(row.route)
        return allowed

    def abandon_probe(self, row: Row) -> None:
        """Release the breaker's probe slot when ``row`` was the probe and leaves without a scoring result."""
        breaker = self._routes[row.route].breaker
        if breaker is not None:
            breaker.probe_abandoned(row, self._clock())
            self._export_parking(row.route)

    def record_success(self, route: str) -> None:
        state = self._routes[route]
        if state.breaker is None or state.budget is None:
            return
        state.budget.deposit()
        if state.breaker.record_success():
            log.info("teacher_breaker_closed", route=route, parked=len(state.parking.rows))
        self._export_parking(route)

    def record_failure(self, route: str, reason: str) -> None:
        state = self._routes[route]
        if state.breaker is None:
            return
        if state.breaker.record_failure(self._clock()):
            log.warning("teacher_breaker_opened", route=route, reason=reason, failures=state.breaker.failures,
                        cooldown_seconds=state.breaker.cooldown_seconds * state.breaker.cooldown_factor)
        self._export_parking(route)

    def breaker_state(self, route: str) -> BreakerState | None:
        breaker = self._routes[route].breaker
        return None if breaker is None else breaker.state

    def may_retry(self, route: str) -> bool:
        """True when a failed group may be scored again now: breaker closed and a budget token spent."""
        state = self._routes[route]
        if state.breaker is None or state.budget is None or state.breaker.state is not BreakerState.CLOSED:
            return False
        return state.budget.try_spend()

    def park(self, row: Row, *, backoff_seconds: float = 0.0) -> bool:
        """Park a row until its teacher is back; False when the route's parking is full."""
        if self.resilience is None:
            raise RuntimeError("rows can be parked only with a resilience policy")
        state = self._routes[row.route]
        now = self._clock()
        since = state.parking.first_parked.pop((row.row_id, row.epoch), now)
        if len(state.parking.rows) >= self.resilience.max_parked_rows:
            return False
        state.parking.rows.append(ParkedRow(row=row, since=since, not_before=now + backoff_seconds))
        self._metrics.route_outcomes.labels(route=row.route, outcome="parked").inc()
        self._export_parking(row.route)
        return True

    def has_parked(self) -> bool:
        return any(state.parking.rows for state in self._routes.values())

    def idle(self) -> bool:
        """True when no row is parked and no route credit is taken."""
        return all(not state.parking.rows and state.in_use == 0 for state in self._routes.values())

    def take_expired(self) -> list[tuple[Row, float]]:
        """Remove and return parked rows that waited longer than the dead-letter time, with their wait."""
        if self.resilience is None:
            return []
        now = self._clock()
        # The scan is linear in the parked rows, so it runs at most every EXPIRY_SCAN_SECONDS.
        if now - self._last_expiry_scan < EXPIRY_SCAN_SECONDS:
            return []
        self._last_expiry_scan = now
        expired = []
        for route, state in self._routes.items():
            rows = state.parking.rows
            waiting = [p for p in rows if now - p.since < self.resilience.dead_letter_seconds]
            if len(waiting) != len(rows):
                expired.extend((p.row, now - p.since) for p in rows
                               if now - p.since >= self.resilience.dead_letter_seconds)
                state.parking.rows = type(rows)(waiting)
                self._export_parking(route)
        return expired

    def take_ready(self) -> Row | None:
        """Remove and return the oldest parked row whose teacher may be called now, or None."""
        now = self._clock()
        for route, state in self._routes.items():
            rows = state.parking.rows
            if not rows or rows[0].not_before > now or state.breaker is None:
                continue
            if not state.breaker.allows(rows[0].row, now):
                self._export_parking(route)
                continue
            parked = rows.popleft()
            state.parking.first_parked[(parked.row.row_id, parked.row.epoch)] = parked.since
            self._export_parking(route)
            return parked.row
        return None

    def fails_fast(self, group: SampledGroup) -> bool:
        """True for a group of a stalled route that is not its probe."""
        state = self._routes[group.row.route]
        return state.stalled_since is not None and state.probe != (group.row.row_id, group.row.epoch)

    def mark_stalled(self, route: str) -> None:
        state = self._routes[route]
        if state.stalled_since is None:
            state.stalled_since = self._clock()
            state.last_probe = state.stalled_since
            state.failed_probes = 0
            log.warning("route_stalled", route=route, stall_seconds=self.stall_seconds)
            self._export_stalled(route)
        elif state.probe is not None:
            state.failed_probes += 1
        self._notify(route, state)

    def mark_healthy(self, route: str) -> None:
        state = self._routes[route]
        if state.stalled_since is not None:
            log.info("route_recovered", route=route, stalled_seconds=self._clock() - state.stalled_since)
            state.stalled_since = None
            self._export_stalled(route)
            self._notify(route, state)

    def _take(self, route: str, state: _RouteState) -> None:
        state.in_use += 1
        self._export(route)

    def _notify(self, route: str, state: _RouteState) -> None:
        state.changed.set()
        state.changed = anyio.Event()
        self._export(route)

    def _export(self, route: str) -> None:
        state = self._routes[route]
        self._credits_gauges[route].set(state.capacity - state.in_use)

    def _export_stalled(self, route: str) -> None:
        self._stalled_gauges[route].set(0 if self._routes[route].stalled_since is None else 1)

    def _export_parking(self, route: str) -> None:
        state = self._routes[route]
        if state.breaker is None:
            return
        self._metrics.route_breaker_state.labels(route=route).set(int(state.breaker.state))
        self._metrics.rows_parked.labels(route=route).set(len(state.parking.rows))


async def dispatch_groups(
    receive_groups: ObjectReceiveStream[SampledGroup],
    route_sends: Mapping[str, ObjectSendStream[SampledGroup]],
    *,
    metrics: Metrics,
) -> None:
    """Stage 3a: hand every group to the pool of its route; close all pools at the end.

    With a :class:`RouteAdmission` in front of the sampler, a route never has
    more groups than its queue and workers can take. So the send waits at most
    until an idle worker of that route takes a group, never on a stalled route.
    """
    depth_gauges = {route: metrics.route_queue_depth.labels(route=route) for route in route_sends}
    try:
        async with receive_groups:
            async for group in receive_groups:
                send = route_sends[group.row.route]
                await send.send(group)
                depth_gauges[group.row.route].set(send.statistics().current_buffer_used)
    finally:
        for send in route_sends.values():
            await send.aclose()


async def score_route(
    receive: ObjectReceiveStream[SampledGroup],
    send_scored: ObjectSendStream[ScoredGroup],
    *,
    route: str,
    scorer: TeacherScorer,
    renderer: PromptRenderer,
    workers: int,
    metrics: Metrics,
    admission: RouteAdmission | None = None,
    gate: StepGate | None = None,
    dead_letters: RejectsFile | None = None,
) -> None:
    """Stage 3b: run ``workers`` scoring workers for one route until its queue closes.

    :param gate: released for every group that is parked instead of scored;
        required when ``admission`` has a resilience policy.
    :param dead_letters: where rows go when the route's parking is full.
    """
    if admission is not None and admission.resilience is not None and gate is None:
        raise ValueError("score_route needs the policy gate when rows can be parked")
    context = _WorkerContext(route=route, scorer=scorer, renderer=renderer, metrics=metrics, admission=admission,
                             gate=gate, dead_letters=dead_letters)
    async with receive, send_scored, anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(_score_worker, receive, send_scored, context)


@dataclass
class _WorkerContext:
    route: str
    scorer: TeacherScorer
    renderer: PromptRenderer
    metrics: Metrics
    admission: RouteAdmission | None
    gate: StepGate | None
    dead_letters: RejectsFile | None


async def _score_worker(
    receive: ObjectReceiveStream[SampledGroup],
    send_scored: ObjectSendStream[ScoredGroup],
    context: _WorkerContext,
) -> None:
    route, metrics, admission = context.route, context.metrics, context.admission
    depth_gauge = metrics.route_queue_depth.labels(route=route)
    scored_counter = metrics.route_scored.labels(route=route)
    resilient = admission is not None and admission.resilience is not None
    async for group in receive:
        depth_gauge.set(receive.statistics().current_buffer_used)

        # The teacher scores exactly the sampled ids after its own prompt.
        if group.row.teacher_messages is not None:
            teacher_prompt_ids = context.renderer.encode(group.row.teacher_messages)
        else:
            teacher_prompt_ids = group.prompt_ids_T
        completions = [sample.completion_ids_T for sample in group.samples_S]

        if admission is not None and admission.fails_fast(group):
            metrics.route_failures.labels(route=route, reason="stalled").inc(len(completions))
            scored = [ScoredCompletion(logprobs_T=None, failure="teacher_stalled") for _ in completions]
        elif resilient:
            found = await _score_or_park(group, teacher_prompt_ids, completions, context)
            if found is None:
                continue
            scored = found
        else:
            scored, _ = await _score_group(group, teacher_prompt_ids, completions, route=route,
                                           scorer=context.scorer, metrics=metrics, admission=admission)

        scored_counter.inc()
        try:
            await send_scored.send(
                ScoredGroup(
                    group=group,
                    teacher_prompt_ids_T=teacher_prompt_ids,
                    teacher_logprobs_S=tuple(s.logprobs_T for s in scored),
                    failures_S=tuple(s.failure for s in scored),
                    echoed_ids_S=tuple(s.echoed_ids_T for s in scored),
                    targets_S=tuple(s.targets for s in scored),
                )
            )
        finally:
            if admission is not None:
                admission.release(group.row)


async def _score_or_park(
    group: SampledGroup,
    teacher_prompt_ids: tuple[int, ...],
    completions: list[tuple[int, ...]],
    context: _WorkerContext,
) -> list[ScoredCompletion] | None:
    """Score a group under the route's breaker and retry budget; park its row and return None when the
    teacher is unavailable."""
    route, metrics, admission = context.route, context.metrics, context.admission
    assert admission is not None and admission.resilience is not None  # noqa: S101 - checked by score_route
    outcomes = metrics.route_outcomes
    while True:
        # 1. An open breaker sends nothing to the teacher.
        if not admission.passes_breaker(group.row):
            _park_group(group, context, backoff_seconds=0.0)
            return None

        # 2. Score. An unavailable teacher either raises or, with scorers that
        # send one request per sample, fails samples with teacher_<reason>.
        try:
            scored, answered = await _score_group(group, teacher_prompt_ids, completions, route=route,
                                                  scorer=context.scorer, metrics=metrics, admission=admission,
                                                  raise_unavailable=True)
            unavailable = _unavailable_reason(scored)
        except BackendError as exc:
            unavailable = exc.reason
        if unavailable is not None:
            admission.record_failure(route, unavailable)
            outcomes.labels(route=route, outcome="failed").inc()
            if admission.may_retry(route):
                outcomes.labels(route=route, outcome="retried").inc()
                continue
            # 3. No retry left now: the row waits and is sampled again later.
            closed = admission.breaker_state(route) is BreakerState.CLOSED
            if closed:
                outcomes.labels(route=route, outcome="budget_exhausted").inc()
            backoff = admission.resilience.cooldown_seconds if closed else 0.0
            _park_group(group, context, backoff_seconds=backoff)
            return None
        if answered:
            admission.record_success(route)
        outcomes.labels(route=route, outcome="scored").inc()
        return scored


def _unavailable_reason(scored: list[ScoredCompletion]) -> str | None:
    """Return the first per-sample failure that means the teacher is unavailable, or None."""
    for completion in scored:
        reason = (completion.failure or "").removeprefix("teacher_")
        if reason in UNAVAILABLE_REASONS:
            return reason
    return None


def _park_group(group: SampledGroup, context: _WorkerContext, *, backoff_seconds: float) -> None:
    """Drop a group's samples and park its row; free its gate slot and route credit."""
    admission, row = context.admission, group.row
    assert admission is not None and context.gate is not None  # noqa: S101 - checked by score_route
    parked = admission.park(row, backoff_seconds=backoff_seconds)
    context.gate.group_failed()
    admission.release(row)
    if not parked:
        context.metrics.route_outcomes.labels(route=context.route, outcome="dead_lettered").inc()
        if context.dead_letters is not None:
            context.dead_letters.write_row(
                row, reason="teacher_unavailable",
                message=f"the teacher of route {row.route!r} is unavailable and its parked rows are at the "
                "limit; replay this line once the teacher is back",
            )


async def _score_group(
    group: SampledGroup,
    teacher_prompt_ids: tuple[int, ...],
    completions: list[tuple[int, ...]],
    *,
    route: str,
    scorer: TeacherScorer,
    metrics: Metrics,
    admission: RouteAdmission | None,
    raise_unavailable: bool = False,
) -> tuple[list[ScoredCompletion], bool]:
    """Score one group; return the per-sample results and whether the teacher responded in time.

    :param raise_unavailable: re-raise a ``BackendError`` whose reason is in
        ``UNAVAILABLE_REASONS`` instead of failing the samples.
    """
    stall_seconds = admission.stall_seconds if admission is not None else None
    inflight_gauge = metrics.route_inflight.labels(route=route)
    inflight_gauge.inc()
    started = anyio.current_time()
    scored: list[ScoredCompletion] | None = None
    try:
        with anyio.move_on_after(stall_seconds):
            scored = await scorer.score(teacher_prompt_ids, completions)
    except BackendError as exc:
        log.warning("teacher_score_failed", route=route, row_id=group.row.row_id, reason=exc.reason, error=str(exc))
        metrics.route_failures.labels(route=route, reason=exc.reason).inc(len(completions))
        if raise_unavailable and exc.reason in UNAVAILABLE_REASONS:
            raise
        # The teacher responded, so the route is not stalled.
        if admission is not None:
            admission.mark_healthy(route)
        return [ScoredCompletion(logprobs_T=None, failure=f"teacher_{exc.reason}") for _ in completions], True
    finally:
        inflight_gauge.dec()
        metrics.route_latency.labels(route=route).observe(anyio.current_time() - started)

    if scored is None:
        log.warning("teacher_score_stalled", route=route, row_id=group.row.row_id, stall_seconds=stall_seconds)
        metrics.route_failures.labels(route=route, reason="stalled").inc(len(completions))
        if admission is not None:
            admission.mark_stalled(route)
        return [ScoredCompletion(logprobs_T=None, failure="teacher_stalled") for _ in completions], False
    if admission is not None:
        admission.mark_healthy(route)
    return scored, True
