"""The three backend interfaces: student sampler, teacher scorer, trainer.

Every implementation works on token ids only. Text never crosses these
interfaces, so nothing is decoded and encoded again between sampling, scoring
and training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from mopd.types import Datum, Sample, StepResult, TopKTargets


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling parameters of the student."""

    n: int
    """Completions per prompt."""
    max_tokens: int
    temperature: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end a completion (EOS is always one of them)."""
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class ScoredCompletion:
    """A teacher's scores for one completion."""

    logprobs_T: tuple[float, ...] | None
    """One logprob per completion token, or None when ``failure`` is set."""
    echoed_ids_T: tuple[int, ...] | None = None
    """Completion ids the server echoed back, when it reports them."""
    failure: str | None = None
    """Reason code when the completion could not be scored."""
    topk_ids_TK: tuple[tuple[int, ...], ...] | None = None
    """Per completion token: the ids of the teacher's top-K next-token candidates
    at that position, most likely first. None unless top-K was requested."""
    topk_logprobs_TK: tuple[tuple[float, ...], ...] | None = None
    """Per completion token: the logprobs of ``topk_ids_TK``, not renormalised."""
    targets: TopKTargets | None = None
    """Blended soft targets, set by the top-K blending scorer only."""


@runtime_checkable
class StudentSampler(Protocol):
    """Samples completions from the current student weights."""

    @property
    def policy_version(self) -> int:
        """Version of the weights that new samples come from."""
        ...

    async def sample(self, prompt_ids_T: Sequence[int], params: SamplingParams) -> list[Sample]:
        """Sample ``params.n`` completions of ``prompt_ids_T``."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class TeacherScorer(Protocol):
    """Scores completion tokens under a frozen teacher."""

    name: str

    async def score(
        self, prompt_ids_T: Sequence[int], completions_S: Sequence[Sequence[int]], *, top_k: int = 0
    ) -> list[ScoredCompletion]:
        """Return, per completion, the logprob of each completion token given the
        prompt and the completion tokens before it.

        :param top_k: when above 0, also return the ``top_k`` most likely ids
            and their logprobs at every completion position.
        """
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Trainer(Protocol):
    """Trains the student and publishes new weights to the sampler."""

    @property
    def policy_version(self) -> int: ...

    async def train_step(self, datums: Sequence[Datum], loss_fn: str) -> StepResult:
        """Run forward_backward over ``datums`` and one optimizer step, then
        publish the new weights so that later samples carry the new version."""
        ...

    async def save_state(self, path: Path) -> None: ...

    async def load_state(self, path: Path) -> None: ...

    async def aclose(self) -> None: ...
