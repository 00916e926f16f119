"""Admission of rows by policy version.

The sampler may start a group only when the trainer will accept its samples:
with ``max_policy_lag = k`` at most ``groups_per_step * (steps_done + 1 + k)``
groups are admitted in total, less those that failed before training. With
k = 0 this means sampling for step s + 1 starts only after step s published
its weights, so every trained sample comes from the latest policy.
"""

from __future__ import annotations

import anyio


class StepGate:
    """Counts admitted groups against the steps the trainer has finished."""

    def __init__(self, *, groups_per_step: int, max_policy_lag: int = 0, max_steps: int = 0) -> None:
        self.groups_per_step = groups_per_step
        self.max_policy_lag = max_policy_lag
        self.max_steps = max_steps
        self.admitted = 0
        """Groups admitted and not failed."""
        self.steps_done = 0
        self.closed = False
        self._changed = anyio.Event()

    @property
    def limit(self) -> int:
        steps_allowed = self.steps_done + 1 + self.max_policy_lag
        if self.max_steps:
            steps_allowed = min(steps_allowed, self.max_steps)
        return self.groups_per_step * steps_allowed

    async def acquire(self) -> bool:
        """Wait until one more group may be sampled; False once the gate is closed."""
        while not self.closed and self.admitted >= self.limit:
            await self._changed.wait()
        if self.closed:
            return False
        self.admitted += 1
        return True

    def group_failed(self) -> None:
        """A group will not reach the trainer; admit another in its place."""
        self.admitted -= 1
        self._notify()

    def step_done(self) -> None:
        self.steps_done += 1
        self._notify()

    def close(self) -> None:
        """Admit nothing more; waiting callers get False."""
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()
