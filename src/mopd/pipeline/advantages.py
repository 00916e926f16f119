"""Stage 4: check alignment, compute per-token advantages, build datums.

Sample reason codes (the ``reason`` label of ``mopd_samples_rejected_total``):

    teacher_<reason>     the teacher failed to score the sample
    empty_completion     the sampler produced no token
    truncated            cut at max_tokens while MOPD_TRUNCATED_POLICY=skip
    length_mismatch      teacher logprobs, sampling logprobs and completion ids differ in length
    echo_mismatch        the teacher echoed ids other than the ones sent
    nonfinite_logprob    a logprob is missing, NaN or infinite
    clamped_logprob      a logprob is at or below a server's clamping sentinel
    stale_policy         the sample is older than MOPD_MAX_POLICY_LAG allows
    missing_topk         topk_forward_kl, but a teacher returned no top-K candidates

A row none of whose samples can be trained goes to the rejects file as
``no_trainable_samples`` with the per-sample reasons.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Literal

import structlog
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from mopd.metrics import Metrics
from mopd.pipeline.gate import StepGate
from mopd.pipeline.reader import RejectsFile
from mopd.types import Datum, RouteStats, ScoredGroup, TopKTargets, TrainGroup

log = structlog.get_logger(__name__)

# vLLM reports logprobs it clamped as -9999.0; anything at or below this is not a real value.
CLAMP_SENTINEL = -9999.0


def check_sample(
    *,
    completion_ids_T: Sequence[int],
    sampling_logprobs_T: Sequence[float],
    teacher_logprobs_T: Sequence[float] | None,
    echoed_ids_T: Sequence[int] | None,
    failure: str | None,
    finish_reason: str,
    truncated_policy: Literal["train", "skip"],
    targets: TopKTargets | None = None,
    require_targets: bool = False,
) -> str | None:
    """Return the reason this sample cannot be trained, or None when it can.

    :param require_targets: the top-K objective trains on ``targets``, so a
        sample without them (or with the wrong length) cannot be trained.
    """
    if failure is not None:
        return failure
    if not completion_ids_T:
        return "empty_completion"
    if finish_reason == "length" and truncated_policy == "skip":
        return "truncated"
    if teacher_logprobs_T is None:
        return "nonfinite_logprob"
    if not (len(teacher_logprobs_T) == len(sampling_logprobs_T) == len(completion_ids_T)):
        return "length_mismatch"
    if echoed_ids_T is not None and tuple(echoed_ids_T) != tuple(completion_ids_T):
        return "echo_mismatch"
    for value in (*teacher_logprobs_T, *sampling_logprobs_T):
        if value is None or not math.isfinite(value):
            return "nonfinite_logprob"
        if value <= CLAMP_SENTINEL:
            return "clamped_logprob"
    if require_targets:
        if targets is None:
            return "missing_topk"
        if not (len(targets.ids_TK) == len(targets.probs_TK) == len(completion_ids_T)):
            return "length_mismatch"
    return None


def discounted_advantages(rewards_T: Sequence[float], discount: float) -> list[float]:
    """Return ``A_t = sum_{j >= t} discount^(j - t) * r_j``; with discount 0, ``A_t = r_t``."""
    advantages = [0.0] * len(rewards_T)
    running = 0.0
    for t in range(len(rewards_T) - 1, -1, -1):
        running = rewards_T[t] + discount * running
        advantages[t] = running
    return advantages


def make_datum(
    *,
    prompt_ids_T: Sequence[int],
    completion_ids_T: Sequence[int],
    sampling_logprobs_T: Sequence[float],
    teacher_logprobs_T: Sequence[float],
    loss_scale: float,
    discount: float = 0.0,
    targets: TopKTargets | None = None,
) -> Datum:
    """Build the training sequence: advantage ``loss_scale * (teacher - sampling)``
    on completion targets, 0 on prompt targets.

    :param discount: with a value above 0, each token's advantage also holds the
        discounted rewards (negative reverse KL) of the tokens after it.
    :param targets: soft top-K targets of the completion tokens, for ``topk_forward_kl``.
    """
    tokens = list(prompt_ids_T) + list(completion_ids_T)
    prompt_targets = len(prompt_ids_T) - 1
    rewards = [loss_scale * (t - s) for t, s in zip(teacher_logprobs_T, sampling_logprobs_T, strict=True)]
    advantages = discounted_advantages(rewards, discount) if discount else rewards
    target_ids = target_probs = None
    if targets is not None:
        target_ids = ((),) * prompt_targets + targets.ids_TK
        target_probs = ((),) * prompt_targets + targets.probs_TK
    return Datum(
        input_ids_T=tuple(tokens[:-1]),
        target_ids_T=tuple(tokens[1:]),
        sampling_logprobs_T=(0.0,) * prompt_targets + tuple(sampling_logprobs_T),
        advantages_T=(0.0,) * prompt_targets + tuple(advantages),
        mask_T=(0.0,) * prompt_targets + (1.0,) * len(completion_ids_T),
        target_ids_TK=target_ids,
        target_probs_TK=target_probs,
    )


def build_train_group(
    scored: ScoredGroup,
    *,
    loss_scale: float,
    truncated_policy: Literal["train", "skip"],
    discount: float = 0.0,
    require_targets: bool = False,
) -> TrainGroup:
    """Check every sample of a scored group and build the datums of those that pass."""
    group = scored.group
    samples = group.samples_S
    count = len(samples)
    teacher_S = scored.teacher_logprobs_S if len(scored.teacher_logprobs_S) == count else (None,) * count
    failures_S = scored.failures_S or (None,) * count
    if len(scored.teacher_logprobs_S) != count:
        failures_S = ("length_mismatch",) * count
    echoed_S = scored.echoed_ids_S if len(scored.echoed_ids_S) == count else (None,) * count
    targets_S = scored.targets_S if len(scored.targets_S) == count else (None,) * count

    datums = []
    rejected: Counter[str] = Counter()
    stats = RouteStats()
    for sample, teacher_T, failure, echoed_T, targets in zip(samples, teacher_S, failures_S, echoed_S, targets_S,
                                                             strict=True):
        reason = check_sample(
            completion_ids_T=sample.completion_ids_T, sampling_logprobs_T=sample.sampling_logprobs_T,
            teacher_logprobs_T=teacher_T, echoed_ids_T=echoed_T, failure=failure,
            finish_reason=sample.finish_reason, truncated_policy=truncated_policy,
            targets=targets, require_targets=require_targets,
        )
        if reason is not None:
            rejected[reason] += 1
            continue
        datums.append(make_datum(
            prompt_ids_T=group.prompt_ids_T, completion_ids_T=sample.completion_ids_T,
            sampling_logprobs_T=sample.sampling_logprobs_T, teacher_logprobs_T=teacher_T, loss_scale=loss_scale,
            discount=discount, targets=targets if require_targets else None,
        ))
        stats = stats.merge(RouteStats(
            tokens=len(sample.completion_ids_T),
            reverse_kl_sum=sum(s - t for s, t in zip(sample.sampling_logprobs_T, teacher_T, strict=True)),
            teacher_nll_sum=-sum(teacher_T),
            student_nll_sum=-sum(sample.sampling_logprobs_T),
            samples=1,
            truncated_samples=int(sample.finish_reason == "length"),
            topk_tokens=len(targets.mass_T) if require_targets and targets is not None else 0,
            topk_mass_sum=sum(targets.mass_T) if require_targets and targets is not None else 0.0,
            topk_entropy_sum=sum(targets.entropy_T) if require_targets and targets is not None else 0.0,
        ))
    return TrainGroup(
        row=group.row, policy_version=group.policy_version, datums=tuple(datums), stats=stats,
        rejected_samples=dict(rejected),
    )


async def build_advantages(
    receive_scored: ObjectReceiveStream[ScoredGroup],
    send_train: ObjectSendStream[TrainGroup],
    *,
    loss_scale: float,
    truncated_policy: Literal["train", "skip"],
    gate: StepGate,
    rejects: RejectsFile,
    metrics: Metrics,
    discount: float = 0.0,
    require_targets: bool = False,
) -> None:
    """Stage 4: turn scored groups into train groups; reject rows with nothing to train."""
    async with receive_scored, send_train:
        async for scored in receive_scored:
            train_group = build_train_group(scored, loss_scale=loss_scale, truncated_policy=truncated_policy,
                                            discount=discount, require_targets=require_targets)
            row = train_group.row
            for reason, count in train_group.rejected_samples.items():
                metrics.samples_rejected.labels(route=row.route, reason=reason).inc(count)

            if not train_group.datums:
                reasons = ", ".join(f"{r}={c}" for r, c in sorted(train_group.rejected_samples.items()))
                rejects.write_row(
                    row, reason="no_trainable_samples", message=f"no sample of this row can be trained ({reasons})",
                )
                gate.group_failed()
                continue
            await send_train.send(train_group)
            metrics.queue_depth.labels(queue="train").set(send_train.statistics().current_buffer_used)
