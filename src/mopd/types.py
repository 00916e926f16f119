"""Messages that flow between the pipeline stages.

Axis suffixes used across the package: ``_S`` samples, ``_T`` tokens, ``_R``
routes. Every message is a frozen dataclass: a stage never mutates what it
received, it builds the next message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Messages = tuple[dict[str, Any], ...]


@dataclass(frozen=True, slots=True)
class Row:
    """One validated input row."""

    row_id: str
    """Stable id: ``<source>:<line number>`` (line numbers start at 1)."""
    source: str
    """Path of the file the row came from."""
    line_number: int
    route: str
    """Route value that selects the teacher."""
    messages: Messages
    """Student chat messages (OpenAI style)."""
    teacher_messages: Messages | None
    """Privileged teacher prompt, or None to score under the student prompt."""
    expected_answer: str | None = None
    extra_info: dict[str, Any] | None = None
    epoch: int = 0
    """Pass over the input that produced this row, starting at 0."""
    line: str | None = None
    """The original input line, kept so that a later stage's reject or dead letter can write it."""
    end_offset: int = 0
    """Byte offset just after the line in its source, where a resumed reader may seek."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One completion sampled by the student."""

    completion_ids_T: tuple[int, ...]
    """Exactly the token ids the sampler produced, EOS included when sampled."""
    sampling_logprobs_T: tuple[float, ...]
    """Log probability of each completion token under the sampled distribution."""
    finish_reason: str
    """``stop`` (EOS or stop token), ``length`` (cut at max tokens)."""
    policy_version: int
    """Version of the student weights that produced the sample."""


@dataclass(frozen=True, slots=True)
class SampledGroup:
    """All samples for one row, with the prompt ids they were sampled from."""

    row: Row
    prompt_ids_T: tuple[int, ...]
    """Student prompt ids: chat template rendered once, no special tokens added."""
    samples_S: tuple[Sample, ...]
    policy_version: int
    """Policy version the samples came from (all samples share it)."""
    sampled_at: float = 0.0
    """Monotonic time the samples were returned."""


@dataclass(frozen=True, slots=True)
class ScoredGroup:
    """A sampled group after its route's teacher scored every completion token."""

    group: SampledGroup
    teacher_prompt_ids_T: tuple[int, ...]
    """Teacher prompt ids the completions were scored after."""
    teacher_logprobs_S: tuple[tuple[float, ...] | None, ...]
    """Per sample: one teacher logprob per completion token, or None when the
    teacher failed on that sample (the reason is in ``failures_S``)."""
    failures_S: tuple[str | None, ...] = ()
    """Per sample: reason code of a scoring failure, or None."""
    echoed_ids_S: tuple[tuple[int, ...] | None, ...] = ()
    """Per sample: completion ids the teacher server echoed back, when it reports them."""
    targets_S: tuple[TopKTargets | None, ...] = ()
    """Per sample: soft targets of the top-K objective; empty for the sampled objective."""


@dataclass(frozen=True, slots=True)
class TopKTargets:
    """Soft targets of one completion for ``topk_forward_kl``, blended across teachers."""

    ids_TK: tuple[tuple[int, ...], ...]
    """Per completion token: the kept candidate ids, most likely first."""
    probs_TK: tuple[tuple[float, ...], ...]
    """Per completion token: probabilities of ``ids_TK``, summing to 1."""
    mass_T: tuple[float, ...]
    """Per completion token: the probability the teachers' top-K held before renormalising
    (weighted mean over teachers)."""
    entropy_T: tuple[float, ...]
    """Per completion token: entropy of the target distribution in nats."""


@dataclass(frozen=True, slots=True)
class Datum:
    """One training sequence for the ``importance_sampling`` loss.

    Element ``i`` of ``input_ids_T`` predicts ``target_ids_T[i]``; prompt
    positions carry advantage 0 and mask 0.
    """

    input_ids_T: tuple[int, ...]
    target_ids_T: tuple[int, ...]
    sampling_logprobs_T: tuple[float, ...]
    advantages_T: tuple[float, ...]
    mask_T: tuple[float, ...]
    """1.0 on completion tokens that are trained, 0.0 elsewhere."""
    target_ids_TK: tuple[tuple[int, ...], ...] | None = None
    """``topk_forward_kl`` only: candidate ids per position (empty on prompt positions)."""
    target_probs_TK: tuple[tuple[float, ...], ...] | None = None
    """``topk_forward_kl`` only: probabilities of ``target_ids_TK``."""


@dataclass(frozen=True, slots=True)
class RouteStats:
    """Sums over the trained tokens of one group, for per-route metrics."""

    tokens: int = 0
    reverse_kl_sum: float = 0.0
    """Sum of ``sampling_logprob - teacher_logprob``."""
    teacher_nll_sum: float = 0.0
    student_nll_sum: float = 0.0
    samples: int = 0
    truncated_samples: int = 0
    topk_tokens: int = 0
    """Tokens trained on top-K targets."""
    topk_mass_sum: float = 0.0
    topk_entropy_sum: float = 0.0

    def merge(self, other: RouteStats) -> RouteStats:
        return RouteStats(
            tokens=self.tokens + other.tokens,
            reverse_kl_sum=self.reverse_kl_sum + other.reverse_kl_sum,
            teacher_nll_sum=self.teacher_nll_sum + other.teacher_nll_sum,
            student_nll_sum=self.student_nll_sum + other.student_nll_sum,
            samples=self.samples + other.samples,
            truncated_samples=self.truncated_samples + other.truncated_samples,
            topk_tokens=self.topk_tokens + other.topk_tokens,
            topk_mass_sum=self.topk_mass_sum + other.topk_mass_sum,
            topk_entropy_sum=self.topk_entropy_sum + other.topk_entropy_sum,
        )


@dataclass(frozen=True, slots=True)
class TrainGroup:
    """The datums built from one row, ready for the trainer."""

    row: Row
    policy_version: int
    datums: tuple[Datum, ...]
    stats: RouteStats
    rejected_samples: dict[str, int] = field(default_factory=dict)
    """Reason code -> count of samples of this group that were not trained."""


@dataclass(frozen=True, slots=True)
class StepResult:
    """Report of one optimizer step."""

    step: int
    policy_version: int
    """Version published to the sampler after the step."""
    loss: float
    grad_norm: float
    datums: int
    tokens: int
    seconds: float
    extra: dict[str, float] = field(default_factory=dict)
