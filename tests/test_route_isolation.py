"""Route isolation and policy lag through the real pipeline with simulated backends on virtual time."""

from __future__ import annotations

from mopd.sim import ServerModel, run_virtual
from mopd.sim.scenario import Scenario, Trace, simulate

HEALTHY, STALLED = "arithmetic-teacher", "math-teacher"


def routed(**overrides: object) -> Scenario:
    values: dict[str, object] = {
        "duration_seconds": 40.0,
        "student": ServerModel(capacity_sequences=64, step_seconds=0.01),
        "teacher": ServerModel(capacity_sequences=64, step_seconds=0.02),
        "workers_per_route": 4,
        "route_queue_size": 4,
        "completions_per_prompt": 4,
        "completion_tokens": 16,
        "groups_per_step": 8,
        "train_step_seconds": 0.15,
        "route_stall_seconds": 1.0,
        "window": 32,
        "monitor_seconds": 1.0,
    }
    values.update(overrides)
    return Scenario(**values)  # type: ignore[arg-type]


def stall_math_teacher_at(seconds: float) -> list:
    return [(seconds, lambda deployment: deployment.teacher_servers[STALLED].stall())]


def test_stalled_teacher_leaves_other_route_its_throughput() -> None:
    both = run_virtual(simulate, routed())
    one = run_virtual(simulate, routed(events=stall_math_teacher_at(10.0)))

    assert one.rate(10, 40, HEALTHY) >= 0.9 * both.rate(10, 40, HEALTHY)
    # Monitor samples are one second apart; groups scored before the stall finish training just after it.
    assert one.rows(STALLED)[-1] == one.rows(STALLED)[12]
    assert one.result is not None
    assert one.result.rows_rejected > 0


def test_stalled_route_sheds_rows_and_recovers() -> None:
    def resume(deployment) -> None:  # noqa: ANN001 - a scenario Deployment
        deployment.teacher_servers[STALLED].resume()

    trace = run_virtual(simulate, routed(events=[*stall_math_teacher_at(5.0), (20.0, resume)]))

    # Trained again after a probe gets a response.
    assert trace.rows(STALLED)[-1] > trace.rows(STALLED)[20]
    assert trace.rate(5, 40, HEALTHY) > 0


def test_lag_one_overlaps_sampling_with_training() -> None:
    def lagged(lag: int) -> Trace:
        return run_virtual(simulate, routed(max_policy_lag=lag, route_stall_seconds=None, window=64,
                                            completion_tokens=15, train_step_seconds=0.15))

    strict, lag_one = lagged(0), lagged(1)
    assert lag_one.rate(10, 40) >= 1.6 * strict.rate(10, 40)
    assert strict.stale_groups == 0
    assert lag_one.stale_groups == 0
