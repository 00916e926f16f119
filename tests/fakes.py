"""Hand-made backends for pipeline tests: deterministic, recording what they receive."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from mopd.backends.base import SamplingParams, ScoredCompletion
from mopd.types import Datum, Sample, StepResult


@dataclass
class RecordingSampler:
    """Samples ``completion`` for every prompt at the current policy version."""

    completion: tuple[int, ...] = (11, 12, 2)
    logprob: float = -1.0
    delay: float = 0.0
    prompts: list[tuple[int, ...]] = field(default_factory=list)
    version: int = 0

    @property
    def policy_version(self) -> int:
        return self.version

    async def sample(self, prompt_ids_T: Sequence[int], params: SamplingParams) -> list[Sample]:
        self.prompts.append(tuple(prompt_ids_T))
        if self.delay:
            await anyio.sleep(self.delay)
        return [
            Sample(completion_ids_T=self.completion, sampling_logprobs_T=(self.logprob,) * len(self.completion),
                   finish_reason="stop", policy_version=self.version)
            for _ in range(params.n)
        ]

    async def aclose(self) -> None:
        return None


@dataclass
class OracleTeacher:
    """Scores every token with ``logprob``; records prompts and completions."""

    name: str
    logprob: float = -0.5
    fail_with: Exception | None = None
    calls: list[tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]] = field(default_factory=list)

    async def score(self, prompt_ids_T: Sequence[int], completions_S: Sequence[Sequence[int]]) -> list[ScoredCompletion]:
        self.calls.append((tuple(prompt_ids_T), tuple(tuple(c) for c in completions_S)))
        if self.fail_with is not None:
            raise self.fail_with
        return [ScoredCompletion(logprobs_T=(self.logprob,) * len(c), echoed_ids_T=tuple(c)) for c in completions_S]

    async def aclose(self) -> None:
        return None


@dataclass
class RecordingTrainer:
    """Counts steps and publishes a new version to ``sampler`` after each."""

    sampler: RecordingSampler
    steps: list[list[Datum]] = field(default_factory=list)
    versions_seen: list[int] = field(default_factory=list)
    step_seconds: float = 0.0

    @property
    def policy_version(self) -> int:
        return self.sampler.version

    async def train_step(self, datums: Sequence[Datum], loss_fn: str) -> StepResult:
        if self.step_seconds:
            await anyio.sleep(self.step_seconds)
        self.steps.append(list(datums))
        self.sampler.version += 1
        return StepResult(step=len(self.steps), policy_version=self.sampler.version, loss=0.0, grad_norm=0.0,
                          datums=len(datums), tokens=sum(int(sum(d.mask_T)) for d in datums), seconds=0.0)

    async def save_state(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(self.sampler.version))

    async def load_state(self, path: Path) -> None:
        self.sampler.version = int(path.read_text())

    async def aclose(self) -> None:
        return None
