"""Local backend: batching executor, sampler, scorer and trainer on real tiny models."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import torch

from mopd.backends.base import SamplingParams
from mopd.backends.local.executor import DeviceExecutor
from mopd.backends.local.models import LocalSampler, LocalScorer, LocalTrainer, load_causal_lm
from mopd.pipeline.advantages import make_datum

CPU = torch.device("cpu")
EOS = 2


async def test_executor_batches_concurrent_jobs(executor: DeviceExecutor) -> None:
    batches: list[int] = []

    def run(payloads: list[int]) -> list[int]:
        batches.append(len(payloads))
        return [p * 2 for p in payloads]

    results: dict[int, int] = {}

    async def one(i: int) -> None:
        results[i] = await executor.submit(key="double", run=run, payload=i)

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(one, i)

    assert results == {i: i * 2 for i in range(20)}
    assert sum(batches) == 20
    assert len(batches) < 20


async def test_executor_error_reaches_every_caller(executor: DeviceExecutor) -> None:
    def run(payloads: list[int]) -> list[int]:
        raise ValueError("broken batch")

    with pytest.raises(ValueError, match="broken batch"):
        await executor.submit(key="x", run=run, payload=1)


async def test_sampler_returns_n_samples_with_version(tiny_models: Path, executor: DeviceExecutor) -> None:
    sampler = LocalSampler(model=load_causal_lm(tiny_models / "student", device=CPU), executor=executor,
                           eos_token_ids=[EOS], pad_token_id=0, seed=0)
    samples = await sampler.sample([1, 20, 21], SamplingParams(n=3, max_tokens=5))

    assert len(samples) == 3
    for sample in samples:
        assert sample.policy_version == 0
        assert 1 <= len(sample.completion_ids_T) <= 5
        assert len(sample.sampling_logprobs_T) == len(sample.completion_ids_T)
        if sample.finish_reason == "stop":
            assert sample.completion_ids_T[-1] == EOS
        else:
            assert sample.finish_reason == "length"
            assert EOS not in sample.completion_ids_T


async def test_trainer_step_raises_logprob_of_advantaged_token(tiny_models: Path, executor: DeviceExecutor) -> None:
    sampler_model = load_causal_lm(tiny_models / "student", device=CPU)
    sampler = LocalSampler(model=sampler_model, executor=executor, eos_token_ids=[EOS], pad_token_id=0)
    trainer = LocalTrainer(model=load_causal_lm(tiny_models / "student", device=CPU, train=True), sampler=sampler,
                           executor=executor, pad_token_id=0, learning_rate=1e-2, max_grad_norm=1.0)
    scorer = LocalScorer(name="self", model=sampler_model, executor=executor, pad_token_id=0)
    prompt, completion = [1, 30, 31], [40, 41]
    (before,) = await scorer.score(prompt, [completion])
    datum = make_datum(prompt_ids_T=prompt, completion_ids_T=completion, sampling_logprobs_T=before.logprobs_T,
                       teacher_logprobs_T=[v + 1.0 for v in before.logprobs_T], loss_scale=1.0)

    result = await trainer.train_step([datum], "importance_sampling")

    (after,) = await scorer.score(prompt, [completion])
    assert result.policy_version == 1
    assert sampler.policy_version == 1
    assert result.tokens == 2
    assert all(a > b for a, b in zip(after.logprobs_T, before.logprobs_T, strict=True))


async def test_trainer_state_round_trips(tiny_models: Path, executor: DeviceExecutor, tmp_path: Path) -> None:
    sampler = LocalSampler(model=load_causal_lm(tiny_models / "student", device=CPU), executor=executor,
                           eos_token_ids=[EOS], pad_token_id=0)
    trainer = LocalTrainer(model=load_causal_lm(tiny_models / "student", device=CPU, train=True), sampler=sampler,
                           executor=executor, pad_token_id=0, learning_rate=1e-2)
    datum = make_datum(prompt_ids_T=[1, 5], completion_ids_T=[6], sampling_logprobs_T=[-3.0],
                       teacher_logprobs_T=[-1.0], loss_scale=1.0)
    await trainer.train_step([datum], "importance_sampling")
    await trainer.save_state(tmp_path / "state.pt")

    fresh_sampler = LocalSampler(model=load_causal_lm(tiny_models / "student", device=CPU), executor=executor,
                                 eos_token_ids=[EOS], pad_token_id=0)
    fresh = LocalTrainer(model=load_causal_lm(tiny_models / "student", device=CPU, train=True),
                         sampler=fresh_sampler, executor=executor, pad_token_id=0, learning_rate=1e-2)
    await fresh.load_state(tmp_path / "state.pt")

    assert fresh.policy_version == 1
    assert fresh_sampler.policy_version == 1
    params = dict(fresh_sampler._model.named_parameters())
    for name, value in sampler._model.named_parameters():
        assert torch.equal(value, params[name])
