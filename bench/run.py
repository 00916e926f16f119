"""``make bench``: simulated-deployment benchmarks of the real pipeline.

Prints one line per figure while it runs and, as its last line, one JSON
object with every figure. Scenarios run on virtual time (``mopd.sim.clock``).
The overhead and memory figures run on real time in a subprocess pinned to
one CPU core. That subprocess starts first, so it overlaps the simulations.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import orjson

from mopd.sim.scenario import Scenario, Trace, simulate
from mopd.logging import configure_logging
from mopd.sim import ServerModel, run_virtual
from mopd.sim.backends import percentile

HERE = Path(__file__).resolve().parent
STEP = 0.01
"""Seconds of one student decode step at or below capacity."""


def _note(message: str) -> None:
    print(message, flush=True)


def utilization() -> float:
    """Strict on-policy rows/s over the critical-path ideal: sampling and scoring
    a step's groups at full capacity, then the training step and weight sync."""
    tokens, n, groups, capacity = 128, 4, 16, 64
    teacher_step, train, sync = 0.02, 1.2, 0.05
    scenario = Scenario(
        duration_seconds=200, student=ServerModel(capacity_sequences=capacity, step_seconds=STEP),
        teacher=ServerModel(capacity_sequences=capacity, step_seconds=teacher_step),
        completions_per_prompt=n, completion_tokens=tokens, groups_per_step=groups,
        train_step_seconds=train, sync_seconds=sync,
    )
    trace = run_virtual(simulate, scenario)
    # One step's groups fill the student's batch exactly, so sampling takes ``tokens`` steps.
    ideal = groups / (tokens * STEP + teacher_step + train + sync)
    return trace.rate(40, 200) / ideal


def _student_bound(window: int | None, events: list | None = None, duration: float = 120) -> Scenario:
    """A deployment whose only bottleneck is the student (32 sequences per step at full speed)."""
    return Scenario(
        duration_seconds=duration, student=ServerModel(capacity_sequences=32, step_seconds=STEP),
        groups_per_step=32, max_policy_lag=1_000_000, window=window, events=events or [],
        workers_per_route=64, route_queue_size=64,
    )


def controller() -> dict[str, float]:
    uncongested = 32 * STEP
    rates = {}
    for window in (8, 16, 24, 32, 40, 48, 64, 96, 128):
        rates[window] = run_virtual(simulate, _student_bound(window)).rate(20, 120)
        _note(f"fixed window {window}: {rates[window]:.2f} rows/s")
    adaptive = run_virtual(simulate, _student_bound(None))
    adaptive_rate = adaptive.rate(20, 120)
    latencies = [seconds for finished, seconds in adaptive.latencies if finished >= 20]
    best = max(rates, key=rates.__getitem__)
    _note(f"adaptive: {adaptive_rate:.2f} rows/s, final window {adaptive.windows[-1]}; best fixed {best}")
    return {
        "controller_vs_best_fixed": adaptive_rate / rates[best],
        "controller_p95_latency_ratio": percentile(latencies, 0.95) / uncongested,
        "best_fixed_window": best,
        "adaptive_final_window": adaptive.windows[-1],
    }


def recovery() -> dict[str, float]:
    """Seconds after the student's capacity halves until throughput is back to 90%
    of the new optimum (and, for information, until p95 latency is within 1.5x)."""
    change_at, window_seconds = 60.0, 2.0
    events = [(change_at, lambda deployment: deployment.student_server.set_capacity(16))]
    trace = run_virtual(simulate, _student_bound(None, events, duration=120))
    optimum = 16 / (32 * STEP)
    throughput_back = _first_time(
        trace, change_at, lambda t: trace.rate(t, t + window_seconds) >= 0.9 * optimum, window_seconds)
    latency_back = _first_time(
        trace, change_at, lambda t: _p95_between(trace, t, t + window_seconds) <= 1.5 * 32 * STEP, window_seconds)
    return {"recovery_seconds": throughput_back, "recovery_latency_seconds": latency_back}


def _first_time(trace: Trace, start: float, condition, window_seconds: float) -> float:
    for t in trace.times:
        if t >= start and t + window_seconds <= trace.times[-1] and condition(t):
            return t - start
    return float("inf")


def _p95_between(trace: Trace, start: float, end: float) -> float:
    return percentile([s for finished, s in trace.latencies if start <= finished < end], 0.95)


def lag_speedup() -> dict[str, float]:
    """max_policy_lag=1 over strict, with sampling a step (0.32 s) about as long as training it (0.32 s)."""
    def scenario(lag: int) -> Scenario:
        return Scenario(
            duration_seconds=120, student=ServerModel(capacity_sequences=64, step_seconds=STEP),
            completions_per_prompt=4, completion_tokens=32, groups_per_step=16, max_policy_lag=lag,
            train_step_seconds=0.30, sync_seconds=0.02,
        )
    strict = run_virtual(simulate, scenario(0))
    lagged = run_virtual(simulate, scenario(1))
    _note(f"strict {strict.rate(20, 120):.2f} rows/s, lag 1 {lagged.rate(20, 120):.2f} rows/s, "
          f"stale groups dropped {lagged.stale_groups}")
    return {"lag1_speedup_vs_strict": lagged.rate(20, 120) / strict.rate(20, 120),
            "lag1_stale_groups": lagged.stale_groups}


def stalled_route() -> float:
    """Rows/s of the healthy route while the other route's teacher stops responding,
    over its rows/s with both teachers healthy (strict on-policy)."""
    healthy_route, stalled = "arithmetic-teacher", "math-teacher"
    stall_at = 20.0

    def scenario(events: list) -> Scenario:
        return Scenario(
            duration_seconds=140, student=ServerModel(capacity_sequences=64, step_seconds=STEP),
            teacher=ServerModel(capacity_sequences=64, step_seconds=0.02), workers_per_route=8,
            route_queue_size=8, completions_per_prompt=4, completion_tokens=32, groups_per_step=16,
            train_step_seconds=0.30, sync_seconds=0.02, route_stall_seconds=2.0, events=events,
        )
    both = run_virtual(simulate, scenario([]))
    one = run_virtual(simulate, scenario([(stall_at, lambda d: d.teacher_servers[stalled].stall())]))
    healthy_rate = both.rate(stall_at, 140, healthy_route)
    stalled_rate = one.rate(stall_at, 140, healthy_route)
    _note(f"{healthy_route}: {healthy_rate:.2f} rows/s with both healthy, {stalled_rate:.2f} rows/s while "
          f"{stalled} is stalled")
    return stalled_rate / healthy_rate


def main() -> None:
    configure_logging(level="error", fmt="json")
    started = time.monotonic()
    cores = sorted(os.sched_getaffinity(0))
    overhead_core, sim_core = cores[0], cores[-1]

    # The real-time runs go first, on their own core, so they overlap the simulations.
    def pinned(*args: str) -> subprocess.Popen:
        return subprocess.Popen(
            ["taskset", "-c", str(overhead_core), sys.executable, str(HERE / "overhead.py"), *args],
            stdout=subprocess.PIPE, text=True,
        )
    rss_run = pinned("rss")
    os.sched_setaffinity(0, {sim_core})

    figures: dict[str, float] = {}
    figures["utilization_vs_bottleneck"] = utilization()
    _note(f"utilization_vs_bottleneck {figures['utilization_vs_bottleneck']:.3f}")
    figures.update(controller())
    figures.update(recovery())
    _note(f"recovery_seconds {figures['recovery_seconds']}")
    figures.update(lag_speedup())
    figures["stalled_route_throughput_ratio"] = stalled_route()

    rss = orjson.loads(rss_run.communicate()[0].strip().splitlines()[-1])
    _note(f"1,000,000 rows in {rss['seconds']:.0f} s; resident memory grew {rss['rss_growth_mb']:.1f} MB")
    tokens_run = pinned("tokens")
    tokens = orjson.loads(tokens_run.communicate()[0].strip().splitlines()[-1])
    figures["overhead_tokens_per_s"] = tokens["overhead_tokens_per_s"]
    figures["rss_growth_mb_1m_rows"] = rss["rss_growth_mb"]
    figures["bench_seconds"] = time.monotonic() - started
    print(orjson.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}).decode())


if __name__ == "__main__":
    main()
