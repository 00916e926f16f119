"""Run state behind the ``/healthz``, ``/readyz`` and ``/status`` endpoints.

The service moves through these phases, in order:

    starting -> loading_backends -> evaluating -> training [-> draining] -> finishing -> finished

and ``failed`` from any phase. ``draining`` follows a stop signal or max_steps;
``finishing`` covers the final evaluation and the summary.

Readiness: the service is ready from ``evaluating`` (every backend is loaded,
so training can start) until it begins to drain after a stop request or
max_steps. A stalled route does not make the service unready, because the
other routes keep training and restarting mopd does not fix a slow or dead
teacher. The dispatcher marks a route stalled (``mopd_teacher_route_stalled``)
when a teacher call outlasts MOPD_ROUTE_STALL_SECONDS, and ``/readyz`` and
``/status`` list the marked routes.

Counters and gauges come from the service's Prometheus registry, so the JSON
and the metrics never disagree. The phase, the stages and the route list are
set by the service as it runs. Every method is thread-safe, because the HTTP
server reads the status from its own threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from mopd.metrics import Metrics

PHASES = ("starting", "loading_backends", "evaluating", "training", "draining", "finishing", "finished", "failed")
READY_PHASES = frozenset({"evaluating", "training"})


@dataclass
class _RouteProgress:
    scored: float = 0.0
    changed_at: float = 0.0


class ServiceStatus:
    """Phase, stage states and per-route progress of one service instance.

    :param metrics: the metrics whose registry supplies the counters.
    :param clock: monotonic clock in seconds; tests pass a fake one.
    """

    def __init__(self, metrics: Metrics, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._started_at = clock()
        self._phase = "starting"
        self._error: str | None = None
        self._stages: dict[str, str] = {}
        self._routes: dict[str, _RouteProgress] = {}

    # --- updates from the service ---------------------------------------------

    def set_phase(self, phase: str, *, error: str | None = None) -> None:
        """Enter ``phase``; ``error`` explains a ``failed`` phase."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(PHASES)}")
        with self._lock:
            if self._phase in ("finished", "failed"):
                return
            self._phase = phase
            self._error = error

    def set_routes(self, routes: Iterable[str]) -> None:
        """Declare the configured routes, so routes that never scored are listed too."""
        now = self._clock()
        with self._lock:
            for route in routes:
                self._routes.setdefault(route, _RouteProgress(changed_at=now))

    def set_stage(self, stage: str, state: str) -> None:
        """Record a stage's state: ``running``, ``finished``, ``failed`` or ``cancelled``."""
        with self._lock:
            self._stages[stage] = state

    # --- reads from the HTTP server ---------------------------------------------

    @property
    def phase(self) -> str:
        with self._lock:
            return self._phase

    @property
    def ready(self) -> bool:
        return self.phase in READY_PHASES

    def refresh(self) -> None:
        """Note which routes scored since the last call, for ``seconds_since_progress``."""
        now = self._clock()
        samples = _samples_by_label(self._metrics, "mopd_teacher_route_scored_total", "route")
        with self._lock:
            for route in samples:
                self._routes.setdefault(route, _RouteProgress(changed_at=now))
            for route, progress in self._routes.items():
                scored = samples.get(route, 0.0)
                if scored != progress.scored:
                    progress.scored = scored
                    progress.changed_at = now

    def stalled_routes(self) -> list[str]:
        """Return the routes the dispatcher currently marks stalled."""
        return sorted(name for name, route in self.snapshot()["routes"].items() if route["stalled"])

    def snapshot(self) -> dict[str, Any]:
        """Return the JSON document of ``/status``."""
        self.refresh()
        now = self._clock()
        m = self._metrics
        inflight = _samples_by_label(m, "mopd_teacher_route_inflight", "route")
        waiting = _samples_by_label(m, "mopd_teacher_route_queue_depth", "route")
        trained = _samples_by_label(m, "mopd_rows_trained_total", "route")
        reverse_kl = _samples_by_label(m, "mopd_reverse_kl", "route")
        credits = _samples_by_label(m, "mopd_teacher_route_credits", "route")
        stalled = _samples_by_label(m, "mopd_teacher_route_stalled", "route")
        breaker = _samples_by_label(m, "mopd_teacher_route_breaker_state", "route")
        parked = _samples_by_label(m, "mopd_teacher_route_parked_rows", "route")
        failures = _failures_by_route(m)

        with self._lock:
            phase, error = self._phase, self._error
            stages = dict(self._stages)
            progress = {name: (p.scored, p.changed_at) for name, p in self._routes.items()}

        routes: dict[str, Any] = {}
        for name, (scored, changed_at) in sorted(progress.items()):
            routes[name] = {
                "scored": int(scored),
                "inflight": int(inflight.get(name, 0.0)),
                "queue_depth": int(waiting.get(name, 0.0)),
                "credits": int(credits[name]) if name in credits else None,
                "rows_trained": int(trained.get(name, 0.0)),
                "failures": failures.get(name, {}),
                "reverse_kl": reverse_kl.get(name),
                "seconds_since_progress": round(now - changed_at, 3),
                "stalled": stalled.get(name, 0.0) >= 1.0,
                "breaker": BREAKER_STATES.get(int(breaker[name])) if name in breaker else None,
                "parked_rows": int(parked.get(name, 0.0)),
            }

        return {
            "phase": phase,
            "ready": phase in READY_PHASES,
            "error": error,
            "uptime_seconds": round(now - self._started_at, 3),
            "stages": stages,
            "rows": {
                "read": int(m.value("mopd_rows_read_total")),
                "rejected": {k: int(v) for k, v in _samples_by_label(m, "mopd_rows_rejected_total", "reason").items()},
                "dead_lettered": int(_sum_samples(m, "mopd_rows_dead_lettered_total")),
            },
            "queues": {k: int(v) for k, v in _samples_by_label(m, "mopd_queue_depth", "queue").items()},
            "student": {
                "concurrency_window": int(m.value("mopd_student_concurrency_window")),
                "inflight": int(m.value("mopd_student_inflight")),
            },
            "routes": routes,
            "trainer": {
                "steps": int(m.value("mopd_train_steps_total")),
                "policy_version": int(m.value("mopd_policy_version")),
            },
        }


BREAKER_STATES = {0: "closed", 1: "open", 2: "half_open"}
"""Values of ``mopd_teacher_route_breaker_state``."""


def _samples_by_label(metrics: Metrics, sample_name: str, label: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == sample_name and label in sample.labels:
                found[sample.labels[label]] = sample.value
    return found


def _sum_samples(metrics: Metrics, sample_name: str) -> float:
    return sum(sample.value for family in metrics.registry.collect() for sample in family.samples
               if sample.name == sample_name)


def _failures_by_route(metrics: Metrics) -> dict[str, dict[str, int]]:
    found: dict[str, dict[str, int]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "mopd_teacher_route_failures_total":
                route, reason = sample.labels["route"], sample.labels["reason"]
                found.setdefault(route, {})[reason] = int(sample.value)
    return found
