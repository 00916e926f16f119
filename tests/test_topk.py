"""topk_forward_kl: blending teachers' top-K, scoring top-K locally and over HTTP, and the loss."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import pytest
import respx
import torch

from mopd.backends.base import ScoredCompletion
from mopd.backends.local.executor import DeviceExecutor
from mopd.backends.local.models import LocalScorer, LocalTrainer, load_causal_lm
from mopd.backends.openai import check_openai_settings
from mopd.backends.openai.client import Deployment, RetryPolicy, Timeouts
from mopd.backends.openai.dialects import Wire
from mopd.backends.openai.sampler import OpenAIScorer
from mopd.errors import ConfigError
from mopd.pipeline.advantages import build_train_group, make_datum
from mopd.settings import load_settings
from mopd.topk import BlendedScorer, WeightedScorer, blend_completion, blend_position, check_topk_size
from mopd.types import Row, Sample, SampledGroup, ScoredGroup

CPU = torch.device("cpu")


def test_blend_renormalises_and_mixes_by_weight() -> None:
    # Teacher A puts a quarter of its mass on each of ids 1 and 2; teacher B (weight 3) is sure of id 2.
    half = math.log(0.25)
    ids, probs, mass, entropy = blend_position(
        [(1.0, (1, 2), (half, half)), (3.0, (2,), (0.0,))], k=2,
    )
    assert ids == (2, 1)
    assert probs == pytest.approx((0.875, 0.125))
    assert mass == pytest.approx((0.5 + 3 * 1.0) / 4)
    assert entropy == pytest.approx(-(0.875 * math.log(0.875) + 0.125 * math.log(0.125)))


def test_blend_keeps_k_of_the_union() -> None:
    ids, probs, _, _ = blend_position(
        [(1.0, (1, 2, 3), (math.log(0.5), math.log(0.3), math.log(0.2))), (1.0, (4, 1), (math.log(0.6), math.log(0.4)))],
        k=2,
    )
    assert ids == (1, 4)
    assert sum(probs) == pytest.approx(1.0)


def test_blended_completion_mixes_sampled_token_logprob() -> None:
    a = ScoredCompletion(logprobs_T=(math.log(0.5),), topk_ids_TK=((7, 8),), topk_logprobs_TK=((-0.7, -1.0),))
    b = ScoredCompletion(logprobs_T=(math.log(0.1),), topk_ids_TK=((8,),), topk_logprobs_TK=((-0.1,),))
    blended = blend_completion([(1.0, a), (1.0, b)], k=2)
    assert blended.logprobs_T == (pytest.approx(math.log(0.3)),)
    assert blended.targets is not None
    assert len(blended.targets.ids_TK) == 1


@pytest.mark.parametrize(
    ("teacher", "reason"),
    [
        pytest.param(ScoredCompletion(logprobs_T=None, failure="teacher_timeout"), "teacher_timeout", id="failed"),
        pytest.param(ScoredCompletion(logprobs_T=(-1.0,)), "missing_topk", id="no-topk"),
        pytest.param(ScoredCompletion(logprobs_T=(-1.0, -1.0), topk_ids_TK=((1,), (1,)),
                                      topk_logprobs_TK=((-1.0,), (-1.0,))), "length_mismatch", id="length"),
    ],
)
def test_blend_fails_sample_on_bad_teacher(teacher: ScoredCompletion, reason: str) -> None:
    good = ScoredCompletion(logprobs_T=(-1.0,), topk_ids_TK=((1,),), topk_logprobs_TK=((-1.0,),))
    assert blend_completion([(1.0, good), (1.0, teacher)], k=2).failure == reason


async def test_local_scorer_topk_matches_full_distribution(tiny_models: Path) -> None:
    executor = DeviceExecutor(max_batch_size=16)
    try:
        model = load_causal_lm(tiny_models / "math-teacher", device=CPU)
        scorer = LocalScorer(name="math", model=model, executor=executor, pad_token_id=0)
        prompt, completion = [1, 30, 31], [40, 41, 42]
        (scored,) = await scorer.score(prompt, [completion], top_k=5)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + completion])).logits[0].float(), -1)
        assert scored.topk_ids_TK is not None
        assert scored.topk_logprobs_TK is not None
        for j in range(len(completion)):
            values, ids = logp[len(prompt) - 1 + j].topk(5)
            assert list(scored.topk_ids_TK[j]) == ids.tolist()
            assert list(scored.topk_logprobs_TK[j]) == pytest.approx(values.tolist(), abs=1e-5)
        (plain,) = await scorer.score(prompt, [completion])
        assert plain.topk_ids_TK is None
        assert plain.logprobs_T == pytest.approx(scored.logprobs_T)
    finally:
        await executor.aclose()


async def test_blended_scorer_to_train_step(tiny_models: Path) -> None:
    """Two local teachers blended, datums with soft targets, one step lowers the cross-entropy."""
    executor = DeviceExecutor(max_batch_size=16)
    try:
        teachers = [
            WeightedScorer(scorer=LocalScorer(name=name, model=load_causal_lm(tiny_models / name, device=CPU),
                                              executor=executor, pad_token_id=0), weight=weight)
            for name, weight in (("math-teacher", 4.0), ("arithmetic-teacher", 1.0))
        ]
        blended = BlendedScorer(name="math-teacher", teachers=teachers, k=8)
        prompt, completion = (1, 30, 31), (40, 41, 42, 2)
        (scored,) = await blended.score(prompt, [completion])
        assert scored.targets is not None
        assert all(len(ids) == 8 for ids in scored.targets.ids_TK)
        assert all(0.0 < mass <= 1.0 for mass in scored.targets.mass_T)

        row = Row(row_id="r:1", source="r", line_number=1, route="math-teacher", messages=(), teacher_messages=None)
        sample = Sample(completion_ids_T=completion, sampling_logprobs_T=(-1.0,) * 4, finish_reason="stop",
                        policy_version=0)
        group = SampledGroup(row=row, prompt_ids_T=prompt, samples_S=(sample,), policy_version=0)
        train_group = build_train_group(
            ScoredGroup(group=group, teacher_prompt_ids_T=prompt, teacher_logprobs_S=(scored.logprobs_T,),
                        failures_S=(None,), targets_S=(scored.targets,)),
            loss_scale=1.0, truncated_policy="train", require_targets=True,
        )
        assert train_group.stats.topk_tokens == 4
        (datum,) = train_group.datums
        assert datum.target_ids_TK is not None
        assert datum.target_ids_TK[:2] == ((), ())

        trainer = LocalTrainer(model=load_causal_lm(tiny_models / "student", device=CPU, train=True), sampler=None,
                               executor=executor, pad_token_id=0, learning_rate=1e-2)
        first = await trainer.train_step([datum], "topk_forward_kl")
        for _ in range(3):
            last = await trainer.train_step([datum], "topk_forward_kl")
        assert last.loss < first.loss
        with pytest.raises(ValueError, match="top-K targets"):
            await trainer.train_step([make_datum(prompt_ids_T=prompt, completion_ids_T=completion,
                                                 sampling_logprobs_T=(-1.0,) * 4, teacher_logprobs_T=(-1.0,) * 4,
                                                 loss_scale=1.0)], "topk_forward_kl")
    finally:
        await executor.aclose()


def test_sample_without_targets_is_rejected() -> None:
    row = Row(row_id="r:1", source="r", line_number=1, route="a", messages=(), teacher_messages=None)
    sample = Sample(completion_ids_T=(5,), sampling_logprobs_T=(-1.0,), finish_reason="stop", policy_version=0)
    group = SampledGroup(row=row, prompt_ids_T=(1, 2), samples_S=(sample,), policy_version=0)
    train_group = build_train_group(
        ScoredGroup(group=group, teacher_prompt_ids_T=(1, 2), teacher_logprobs_S=((-1.0,),), failures_S=(None,)),
        loss_scale=1.0, truncated_policy="train", require_targets=True,
    )
    assert train_group.rejected_samples == {"missing_topk": 1}


def _deployment() -> Deployment:
    return Deployment(name="teacher", base_urls=["http://teacher.test"], api_key=None,
                      timeouts=Timeouts(connect=1, read=1, pool=1), retry=RetryPolicy(max_retries=0), max_connections=4)


async def test_vllm_prompt_logprobs_topk_parsed_by_rank() -> None:
    prompt, completion = [1, 5], [7, 9]

    def entry(actual: int, ranked: list[tuple[int, float]]) -> dict[str, dict[str, float]]:
        out = {str(i): {"logprob": lp, "rank": rank} for rank, (i, lp) in enumerate(ranked, start=1)}
        out.setdefault(str(actual), {"logprob": -6.0, "rank": 40})
        return out

    body = {"choices": [{"prompt_token_ids": prompt + completion, "prompt_logprobs": [
        None, entry(5, [(5, -0.1), (6, -2.5)]), entry(7, [(8, -0.3), (7, -1.4)]), entry(9, [(3, -0.2), (4, -1.9)]),
    ]}]}
    deployment = _deployment()
    try:
        with respx.mock(assert_all_called=True) as router:
            route = router.post("http://teacher.test/v1/completions").mock(return_value=httpx.Response(200, json=body))
            scorer = OpenAIScorer(name="t", deployment=deployment, wire=Wire(dialect="vllm"), model="teacher")
            (scored,) = await scorer.score(prompt, [completion], top_k=2)
    finally:
        await deployment.aclose()
    sent = route.calls[0].request
    assert b'"prompt_logprobs":2' in sent.content
    assert scored.failure is None
    assert scored.logprobs_T == (-1.4, -6.0)
    assert scored.topk_ids_TK == ((8, 7), (3, 4))
    assert scored.topk_logprobs_TK == ((-0.3, -1.4), (-0.2, -1.9))


async def test_sglang_generate_topk_parsed() -> None:
    prompt, completion = [1, 5], [7]
    body = {"meta_info": {
        "input_token_logprobs": [[-0.5, 5, None], [-1.2, 7, None]],
        "input_top_logprobs": [[[-0.5, 5, None]], [[-0.4, 8, None], [-1.2, 7, None]]],
    }}
    deployment = _deployment()
    try:
        with respx.mock(assert_all_called=True) as router:
            route = router.post("http://teacher.test/generate").mock(return_value=httpx.Response(200, json=body))
            scorer = OpenAIScorer(name="t", deployment=deployment,
                                  wire=Wire(dialect="sglang", score_mode="generate"), model="teacher")
            (scored,) = await scorer.score(prompt, [completion], top_k=2)
    finally:
        await deployment.aclose()
    assert b'"top_logprobs_num":2' in route.calls[0].request.content
    assert scored.topk_ids_TK == ((8, 7),)


def test_topk_above_server_limit_stops_start_up() -> None:
    env = {"MOPD_BACKEND": "openai", "MOPD_STUDENT_BASE_URLS": "http://127.0.0.1:8000", "MOPD_LOSS_FN": "topk_forward_kl",
           "MOPD_TOPK": "64", "DISTILLATION_TEACHERS": "t", "MOPD_DATA_PATH": "x.jsonl", "MOPD_STUDENT_MODEL": "s"}
    with pytest.raises(ConfigError, match="MOPD_TOPK=64 is above the teacher servers' limit of 20"):
        check_openai_settings(load_settings(env))
    with pytest.raises(ConfigError, match="score mode 'echo'"):
        check_openai_settings(load_settings({**env, "MOPD_TOPK": "5", "MOPD_OPENAI_DIALECT": "fireworks"}))
    with pytest.raises(ConfigError, match="vocabulary size 260"):
        check_topk_size(300, vocab_size=260)
