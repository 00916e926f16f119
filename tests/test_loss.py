"""The importance_sampling loss and the local sampler's logprobs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mopd.backends.local.models import (
    completion_logprobs,
    generate,
    importance_sampling_loss,
    load_causal_lm,
    pad_datums,
    target_logprobs,
)
from mopd.pipeline.advantages import make_datum


def test_loss_at_rollout_policy_is_sampled_reverse_kl() -> None:
    generator = torch.Generator().manual_seed(0)
    sampling = -torch.rand(3, 5, generator=generator, dtype=torch.float64) * 3
    teacher = -torch.rand(3, 5, generator=generator, dtype=torch.float64) * 3
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 1, 1]], dtype=torch.float64)
    advantages = (teacher - sampling) * mask

    loss = importance_sampling_loss(sampling.clone(), sampling, advantages, mask)

    reverse_kl = ((sampling - teacher) * mask).sum()
    assert loss.item() == pytest.approx(reverse_kl.item(), rel=1e-12)


def test_loss_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    vocab, length = 6, 4
    logits = torch.randn(length, vocab, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 3, 0, 5])
    mask = torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        sampling = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    advantages = torch.tensor([0.0, 0.7, -1.2, 0.4], dtype=torch.float64)

    def loss_of(current: torch.Tensor) -> torch.Tensor:
        learner = torch.log_softmax(current, -1).gather(1, targets[:, None]).squeeze(1)
        return importance_sampling_loss(learner, sampling, advantages, mask)

    loss_of(logits).backward()
    analytic = logits.grad.clone()

    numeric = torch.zeros_like(analytic)
    eps = 1e-6
    with torch.no_grad():
        for i in range(length):
            for j in range(vocab):
                plus, minus = logits.detach().clone(), logits.detach().clone()
                plus[i, j] += eps
                minus[i, j] -= eps
                numeric[i, j] = (loss_of(plus) - loss_of(minus)) / (2 * eps)

    assert torch.allclose(analytic, numeric, atol=1e-7)
    # At the rollout policy the gradient is -advantage * grad(logprob): zero on masked positions.
    assert torch.all(analytic[0] == 0)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_describe_sampled_distribution(tiny_models: Path, temperature: float) -> None:
    model = load_causal_lm(tiny_models / "student", device=torch.device("cpu"))
    prompts = [[1, 40, 41, 42], [1, 50], [1, 60, 61, 62, 63, 64, 65]]
    results = generate(model, prompts, max_tokens=10, temperature=temperature, stop_token_ids=[2],
                       pad_token_id=0, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        for prompt, (ids, logprobs, _) in zip(prompts, results, strict=True):
            full = torch.tensor([prompt + ids])
            logits = model(input_ids=full).logits[0, len(prompt) - 1:-1].float() / temperature
            expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)
            assert len(ids) == len(logprobs)
            assert torch.allclose(torch.tensor(logprobs), expected, atol=1e-4)


def test_scorer_logprobs_match_unpadded_forward(tiny_models: Path) -> None:
    model = load_causal_lm(tiny_models / "math-teacher", device=torch.device("cpu"))
    pairs = [([1, 5, 6], [7, 8, 9]), ([1, 5, 6, 7, 8, 9, 10, 11], [12]), ([1], [3, 4])]

    batched = completion_logprobs(model, pairs, pad_token_id=0)
    for (prompt, completion), got in zip(pairs, batched, strict=True):
        (alone,) = completion_logprobs(model, [(prompt, completion)], pad_token_id=0)
        assert len(got) == len(completion)
        assert torch.allclose(torch.tensor(got), torch.tensor(alone), atol=1e-5)


def test_trainer_logprobs_match_sampler_at_same_weights(tiny_models: Path) -> None:
    model = load_causal_lm(tiny_models / "student", device=torch.device("cpu"))
    prompt = [1, 30, 31, 32]
    (ids, logprobs, _), = generate(model, [prompt], max_tokens=6, temperature=1.0, stop_token_ids=[2],
                                    pad_token_id=0, generator=torch.Generator().manual_seed(3))
    datum = make_datum(prompt_ids_T=prompt, completion_ids_T=ids, sampling_logprobs_T=logprobs,
                       teacher_logprobs_T=logprobs, loss_scale=1.0)
    batch = pad_datums([datum], pad_token_id=0, device=torch.device("cpu"))

    with torch.no_grad():
        learner = target_logprobs(model, batch)

    mask = batch["mask"].bool()
    assert torch.allclose(learner[mask], batch["sampling_logprobs"][mask], atol=1e-4)
