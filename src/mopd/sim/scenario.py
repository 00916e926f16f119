"""Run the real pipeline (``run_pipeline``) against a simulated deployment; call on a virtual-time loop."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from mopd.backends.base import SamplingParams
from mopd.concurrency import AdaptiveConfig, AdaptiveWindow, ConcurrencyController, FixedWindow
from mopd.metrics import Metrics
from mopd.pipeline.reader import RejectsFile, RouteTable
from mopd.pipeline.service import PipelineConfig, PipelineResult, run_pipeline
from mopd.sim import BatchingServer, ServerModel, SimRenderer, SimScorer, SimStudent, SimTrainer, write_rows


@dataclass
class Scenario:
    """One simulated deployment and how long to run it (virtual seconds)."""

    duration_seconds: float
    student: ServerModel
    teacher: ServerModel = field(default_factory=lambda: ServerModel(capacity_sequences=1024, step_seconds=0.005))
    routes: tuple[str, ...] = ("math-teacher", "arithmetic-teacher")
    workers_per_route: int = 16
    route_queue_size: int = 16
    queue_size: int = 64
    completions_per_prompt: int = 1
    completion_tokens: int = 32
    groups_per_step: int = 16
    max_policy_lag: int = 0
    train_step_seconds: float = 0.0
    sync_seconds: float = 0.0
    window: int | None = None
    """Fixed window; None runs the adaptive controller."""
    adaptive: AdaptiveConfig = field(default_factory=lambda: AdaptiveConfig(max_window=512))
    route_stall_seconds: float | None = None
    events: list[tuple[float, Callable[[Deployment], None]]] = field(default_factory=list)
    """(virtual time, action) pairs applied during the run."""
    monitor_seconds: float = 0.5


@dataclass
class Deployment:
    """The simulated servers of one run, for scenario events."""

    student_server: BatchingServer
    teacher_servers: dict[str, BatchingServer]


@dataclass
class Trace:
    """Result of a run: cumulative rows trained per route and student latencies over time."""

    times: list[float] = field(default_factory=list)
    rows_by_route: dict[str, list[float]] = field(default_factory=dict)
    windows: list[int] = field(default_factory=list)
    latencies: list[tuple[float, float]] = field(default_factory=list)
    """(finish time, seconds) of every successful student request."""
    result: PipelineResult | None = None
    stale_groups: int = 0

    def rows(self, route: str | None = None) -> list[float]:
        if route is not None:
            return self.rows_by_route[route]
        return [sum(values) for values in zip(*self.rows_by_route.values(), strict=True)]

    def rate(self, start: float, end: float, route: str | None = None) -> float:
        """Rows trained per second between two monitor times."""
        rows = self.rows(route)
        first = next(i for i, t in enumerate(self.times) if t >= start - 1e-9)
        last = max(i for i, t in enumerate(self.times) if t <= end + 1e-9)
        return (rows[last] - rows[first]) / (self.times[last] - self.times[first])


async def simulate(scenario: Scenario) -> Trace:
    """Run ``scenario`` through ``run_pipeline``; call it on a virtual-time loop."""
    metrics = Metrics()
    student_server = BatchingServer(scenario.student)
    student = SimStudent(student_server)
    teacher_servers = {route: BatchingServer(ServerModel(**vars(scenario.teacher))) for route in scenario.routes}
    scorers = {route: SimScorer(route, server) for route, server in teacher_servers.items()}
    trainer = SimTrainer(student, step_seconds=scenario.train_step_seconds, sync_seconds=scenario.sync_seconds)
    controller: ConcurrencyController
    if scenario.window is None:
        controller = AdaptiveWindow(scenario.adaptive, metrics=metrics)
    else:
        controller = FixedWindow(scenario.window, metrics=metrics)
    deployment = Deployment(student_server=student_server, teacher_servers=teacher_servers)

    with tempfile.TemporaryDirectory(prefix="mopd-bench-") as tmp:
        data = write_rows(Path(tmp) / "rows.jsonl", rows=2000, routes=scenario.routes)
        config = PipelineConfig(
            sources=[data],
            routes=RouteTable(route_key="teacher", messages_key_by_route={r: "teacher_messages" for r in scenario.routes}),
            workers_by_route={r: scenario.workers_per_route for r in scenario.routes},
            sampling=SamplingParams(n=scenario.completions_per_prompt, max_tokens=scenario.completion_tokens),
            groups_per_step=scenario.groups_per_step,
            max_policy_lag=scenario.max_policy_lag,
            epochs=0,
            queue_size=scenario.queue_size,
            route_queue_size=scenario.route_queue_size,
            route_stall_seconds=scenario.route_stall_seconds,
            shutdown_grace_seconds=60.0,
        )
        rejects = RejectsFile(Path(tmp) / "rejects.jsonl", metrics)
        stop = anyio.Event()
        trace = Trace(rows_by_route={r: [] for r in scenario.routes})

        async def monitor() -> None:
            while True:
                trace.times.append(anyio.current_time())
                for route in scenario.routes:
                    trace.rows_by_route[route].append(metrics.value("mopd_rows_trained_total", {"route": route}))
                trace.windows.append(controller.window)
                await anyio.sleep(scenario.monitor_seconds)

        async def apply_events() -> None:
            for at, action in sorted(scenario.events, key=lambda event: event[0]):
                await anyio.sleep(max(0.0, at - anyio.current_time()))
                action(deployment)

        async def stop_at_end() -> None:
            # One monitor sample lands exactly on the end time before the stop.
            await anyio.sleep(scenario.duration_seconds + scenario.monitor_seconds / 2)
            stop.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(student_server.run)
                for server in teacher_servers.values():
                    tg.start_soon(server.run)
                tg.start_soon(monitor)
                tg.start_soon(apply_events)
                tg.start_soon(stop_at_end)
                trace.result = await run_pipeline(
                    config, sampler=student, scorers=scorers, trainer=trainer, renderer=SimRenderer(),
                    controller=controller, rejects=rejects, metrics=metrics, stop=stop,
                )
                tg.cancel_scope.cancel()
        finally:
            rejects.close()

    trace.latencies = student.latencies
    trace.stale_groups = trace.result.state.stale_groups
    return trace
