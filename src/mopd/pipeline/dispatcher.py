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
from mopd.tokenization import PromptRenderer
from mopd.types import Row, SampledGroup, ScoredGroup

log = structlog.get_logger(__name__)

MAX_PROBE_BACKOFF = 16
"""Largest multiple of ``stall_seconds`` between two probes of a stalled route."""


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


class RouteAdmission:
    """Per-route credits and stall marks, shared by the sampler and the route pools.

    :param capacity_by_route: credits per route, at least 1 each.
    :param stall_seconds: a scoring call longer than this marks its route
        stalled; None never marks a route stalled.
    """

    def __init__(
        self,
        capacity_by_route: Mapping[str, int],
        *,
        stall_seconds: float | None,
        metrics: Metrics,
        clock: Clock = loop_clock,
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
        for route in self._routes:
            self._export(route)
            self._export_stalled(route)

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
        self._notify(row.route, state)

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
) -> None:
    """Stage 3b: run ``workers`` scoring workers for one route until its queue closes."""
    async with receive, send_scored, anyio.create_task_group() as tg:
        for _ in range(workers):
            tg.start_soon(_score_worker, receive, send_scored, route, scorer, renderer, metrics, admission)


async def _score_worker(
    receive: ObjectReceiveStream[SampledGroup],
    send_scored: ObjectSendStream[ScoredGroup],
    route: str,
    scorer: TeacherScorer,
    renderer: PromptRenderer,
    metrics: Metrics,
    admission: RouteAdmission | None,
) -> None:
    depth_gauge = metrics.route_queue_depth.labels(route=route)
    scored_counter = metrics.route_scored.labels(route=route)
    async for group in receive:
        depth_gauge.set(receive.statistics().current_buffer_used)

        # The teacher scores exactly the sampled ids after its own prompt.
        if group.row.teacher_messages is not None:
            teacher_prompt_ids = renderer.encode(group.row.teacher_messages)
        else:
            teacher_prompt_ids = group.prompt_ids_T
        completions = [sample.completion_ids_T for sample in group.samples_S]

        if admission is not None and admission.fails_fast(group):
            metrics.route_failures.labels(route=route, reason="stalled").inc(len(completions))
            scored = [ScoredCompletion(logprobs_T=None, failure="teacher_stalled") for _ in completions]
        else:
            scored = await _score_group(group, teacher_prompt_ids, completions, route=route, scorer=scorer,
                                        metrics=metrics, admission=admission)

        scored_counter.inc()
        try:
            await send_scored.send(
                ScoredGroup(
                    group=group,
                    teacher_prompt_ids_T=teacher_prompt_ids,
                    teacher_logprobs_S=tuple(s.logprobs_T for s in scored),
                    failures_S=tuple(s.failure for s in scored),
                    echoed_ids_S=tuple(s.echoed_ids_T for s in scored),
                )
            )
        finally:
            if admission is not None:
                admission.release(group.row)


async def _score_group(
    group: SampledGroup,
    teacher_prompt_ids: tuple[int, ...],
    completions: list[tuple[int, ...]],
    *,
    route: str,
    scorer: TeacherScorer,
    metrics: Metrics,
    admission: RouteAdmission | None,
) -> list[ScoredCompletion]:
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
        # The teacher responded, so the route is not stalled.
        if admission is not None:
            admission.mark_healthy(route)
        return [ScoredCompletion(logprobs_T=None, failure=f"teacher_{exc.reason}") for _ in completions]
    finally:
        inflight_gauge.dec()
        metrics.route_latency.labels(route=route).observe(anyio.current_time() - started)

    if scored is None:
        log.warning("teacher_score_stalled", route=route, row_id=group.row.row_id, stall_seconds=stall_seconds)
        metrics.route_failures.labels(route=route, reason="stalled").inc(len(completions))
        if admission is not None:
            admission.mark_stalled(route)
        return [ScoredCompletion(logprobs_T=None, failure="teacher_stalled") for _ in completions]
    if admission is not None:
        admission.mark_healthy(route)
    return scored
