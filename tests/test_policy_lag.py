"""max_policy_lag: admission by the gate and the drop of stale samples by the submitter."""

from __future__ import annotations

from collections.abc import Sequence

import anyio

from mopd.pipeline.gate import StepGate
from mopd.sim import ServerModel, SimTrainer, run_virtual
from mopd.sim.scenario import Scenario, simulate
from mopd.types import Datum, StepResult


async def test_strict_gate_waits_for_the_step() -> None:
    gate = StepGate(groups_per_step=2, max_policy_lag=0)
    assert await gate.acquire()
    assert await gate.acquire()
    with anyio.move_on_after(0.01) as scope:
        await gate.acquire()
    assert scope.cancelled_caught
    gate.step_done()
    assert await gate.acquire()


async def test_lag_gate_admits_k_steps_ahead() -> None:
    gate = StepGate(groups_per_step=2, max_policy_lag=2)
    for _ in range(6):
        assert await gate.acquire()
    with anyio.move_on_after(0.01) as scope:
        await gate.acquire()
    assert scope.cancelled_caught


class SkippingTrainer(SimTrainer):
    """Publishes two policy versions per step, so samples fall behind faster than the gate expects."""

    async def train_step(self, datums: Sequence[Datum], loss_fn: str) -> StepResult:
        result = await super().train_step(datums, loss_fn)
        self.policy_version += 1
        self.student.policy_version = self.policy_version
        return result


def test_samples_older_than_lag_are_dropped_and_counted(monkeypatch) -> None:  # noqa: ANN001 - pytest fixture
    import mopd.sim.scenario as scenario_module

    monkeypatch.setattr(scenario_module, "SimTrainer", SkippingTrainer)
    scenario = Scenario(
        duration_seconds=20.0, student=ServerModel(capacity_sequences=64, step_seconds=0.01),
        completions_per_prompt=2, completion_tokens=8, groups_per_step=4, max_policy_lag=1,
        train_step_seconds=0.1, window=16,
    )
    trace = run_virtual(simulate, scenario)

    assert trace.result is not None
    assert trace.stale_groups > 0
    assert trace.result.rows_rejected == trace.stale_groups
    assert trace.rows()[-1] > 0
