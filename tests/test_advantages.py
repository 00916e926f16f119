"""Advantage builder: arithmetic, masking and every sample reject reason."""

from __future__ import annotations

import math

import pytest

from mopd.pipeline.advantages import build_train_group, check_sample, make_datum
from mopd.types import Row, SampledGroup, Sample, ScoredGroup

ROW = Row(row_id="r.jsonl:1", source="r.jsonl", line_number=1, route="math-teacher",
          messages=({"role": "user", "content": "q"},), teacher_messages=None)


def test_datum_advantage_is_teacher_minus_sampling_on_completion_only() -> None:
    datum = make_datum(prompt_ids_T=[1, 2, 3], completion_ids_T=[7, 8], sampling_logprobs_T=[-1.0, -2.0],
                       teacher_logprobs_T=[-0.5, -3.0], loss_scale=2.0)

    assert datum.input_ids_T == (1, 2, 3, 7)
    assert datum.target_ids_T == (2, 3, 7, 8)
    assert datum.mask_T == (0.0, 0.0, 1.0, 1.0)
    assert datum.advantages_T == (0.0, 0.0, 1.0, -2.0)
    assert datum.sampling_logprobs_T == (0.0, 0.0, -1.0, -2.0)


def test_single_token_prompt_has_no_prompt_targets() -> None:
    datum = make_datum(prompt_ids_T=[1], completion_ids_T=[5], sampling_logprobs_T=[-1.0],
                       teacher_logprobs_T=[-1.5], loss_scale=1.0)
    assert datum.input_ids_T == (1,)
    assert datum.target_ids_T == (5,)
    assert datum.advantages_T == (-0.5,)


GOOD = dict(completion_ids_T=[4, 5], sampling_logprobs_T=[-1.0, -1.0], teacher_logprobs_T=[-2.0, -0.5],
            echoed_ids_T=None, failure=None, finish_reason="stop", truncated_policy="train")


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        pytest.param({}, None, id="good"),
        pytest.param({"failure": "teacher_timeout"}, "teacher_timeout", id="teacher-failed"),
        pytest.param({"completion_ids_T": [], "sampling_logprobs_T": [], "teacher_logprobs_T": []},
                     "empty_completion", id="empty"),
        pytest.param({"finish_reason": "length", "truncated_policy": "skip"}, "truncated", id="truncated-skip"),
        pytest.param({"finish_reason": "length"}, None, id="truncated-train"),
        pytest.param({"teacher_logprobs_T": [-1.0]}, "length_mismatch", id="teacher-short"),
        pytest.param({"sampling_logprobs_T": [-1.0, -1.0, -1.0]}, "length_mismatch", id="sampling-long"),
        pytest.param({"echoed_ids_T": [4, 6]}, "echo_mismatch", id="echo-mismatch"),
        pytest.param({"echoed_ids_T": [4, 5]}, None, id="echo-match"),
        pytest.param({"teacher_logprobs_T": [-1.0, math.nan]}, "nonfinite_logprob", id="nan"),
        pytest.param({"teacher_logprobs_T": [-math.inf, -1.0]}, "nonfinite_logprob", id="inf"),
        pytest.param({"teacher_logprobs_T": [-1.0, None]}, "nonfinite_logprob", id="none-entry"),
        pytest.param({"teacher_logprobs_T": None}, "nonfinite_logprob", id="missing"),
        pytest.param({"teacher_logprobs_T": [-9999.0, -1.0]}, "clamped_logprob", id="clamped-teacher"),
        pytest.param({"sampling_logprobs_T": [-1.0, -9999.0]}, "clamped_logprob", id="clamped-sampling"),
    ],
)
def test_check_sample_reason(changes: dict, reason: str | None) -> None:
    assert check_sample(**{**GOOD, **changes}) == reason


def scored(samples: list[Sample], teacher: list, failures: list | None = None) -> ScoredGroup:
    group = SampledGroup(row=ROW, prompt_ids_T=(1, 2), samples_S=tuple(samples), policy_version=3)
    return ScoredGroup(group=group, teacher_prompt_ids_T=(1, 2), teacher_logprobs_S=tuple(teacher),
                       failures_S=tuple(failures or [None] * len(samples)))


def sample(ids: tuple[int, ...], lps: tuple[float, ...], reason: str = "stop") -> Sample:
    return Sample(completion_ids_T=ids, sampling_logprobs_T=lps, finish_reason=reason, policy_version=3)


def test_group_keeps_good_samples_and_counts_bad_ones() -> None:
    group = build_train_group(
        scored(
            [sample((5, 6), (-1.0, -2.0)), sample((), ()), sample((7,), (-0.5,))],
            [(-1.5, -1.0), (), (-9999.0,)],
        ),
        loss_scale=1.0, truncated_policy="train",
    )

    assert len(group.datums) == 1
    assert group.rejected_samples == {"empty_completion": 1, "clamped_logprob": 1}
    assert group.policy_version == 3
    stats = group.stats
    assert stats.tokens == 2
    # reverse KL: sampling - teacher = (-1 - -1.5) + (-2 - -1) = -0.5
    assert stats.reverse_kl_sum == pytest.approx(-0.5)
    assert stats.teacher_nll_sum == pytest.approx(2.5)
    assert stats.student_nll_sum == pytest.approx(3.0)


def test_group_with_wrong_number_of_teacher_answers_is_not_trained() -> None:
    group = build_train_group(
        scored([sample((5,), (-1.0,)), sample((6,), (-1.0,))], [(-1.0,)]),
        loss_scale=1.0, truncated_policy="train",
    )
    assert group.datums == ()
    assert group.rejected_samples == {"length_mismatch": 2}


def test_truncated_samples_are_flagged_when_trained() -> None:
    group = build_train_group(
        scored([sample((5, 6), (-1.0, -1.0), reason="length")], [(-1.0, -1.0)]),
        loss_scale=1.0, truncated_policy="train",
    )
    assert len(group.datums) == 1
    assert group.stats.truncated_samples == 1
