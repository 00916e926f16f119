"""LoRA in the local trainer: only the LoRA matrices train, and both publish forms reach a sampler."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mopd.backends.local.executor import DeviceExecutor
from mopd.backends.local.lora import LoraSpec, wrap_lora
from mopd.backends.local.models import LocalSampler, LocalScorer, LocalTrainer, load_causal_lm
from mopd.pipeline.advantages import make_datum

CPU = torch.device("cpu")
EOS = 2
PROMPT, COMPLETION = [1, 30, 31], [40, 41]


def _spec(publish: str, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> LoraSpec:
    return LoraSpec(rank=4, alpha=8.0, target_modules=targets, publish=publish)


async def _train_once(trainer: LocalTrainer, scorer: LocalScorer) -> tuple[tuple[float, ...], tuple[float, ...]]:
    (before,) = await scorer.score(PROMPT, [COMPLETION])
    datum = make_datum(prompt_ids_T=PROMPT, completion_ids_T=COMPLETION, sampling_logprobs_T=before.logprobs_T,
                       teacher_logprobs_T=[v + 1.0 for v in before.logprobs_T], loss_scale=1.0)
    for _ in range(3):
        await trainer.train_step([datum], "importance_sampling")
    (after,) = await scorer.score(PROMPT, [COMPLETION])
    return before.logprobs_T, after.logprobs_T


@pytest.mark.parametrize("publish", ["merged", "adapter"])
async def test_lora_step_reaches_sampler(tiny_models: Path, executor: DeviceExecutor, publish: str) -> None:
    base = load_causal_lm(tiny_models / "student", device=CPU)
    spec = _spec(publish)
    sampler_model = wrap_lora(base, spec).get_base_model() if publish == "adapter" else base
    sampler = LocalSampler(model=sampler_model, executor=executor, eos_token_ids=[EOS], pad_token_id=0)
    trainer_model = load_causal_lm(tiny_models / "student", device=CPU, train=True)
    frozen = {name: value.clone() for name, value in trainer_model.named_parameters()}
    trainer = LocalTrainer(model=trainer_model, sampler=sampler, executor=executor, pad_token_id=0,
                           learning_rate=2e-2, lora=spec)
    scorer = LocalScorer(name="sampler", model=sampler_model, executor=executor, pad_token_id=0)

    before, after = await _train_once(trainer, scorer)

    # The sampler samples from the trained policy: the advantaged tokens became more likely.
    assert sampler.policy_version == 3
    assert all(a > b for a, b in zip(after, before, strict=True))
    # Only LoRA matrices trained: every base weight is unchanged.
    for name, value in trainer._model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(value, frozen[name.replace(".base_layer", "")]), name
    # The sampler's model computes what the trainer's does.
    ids = torch.tensor([PROMPT + COMPLETION])
    with torch.no_grad():
        torch.testing.assert_close(sampler_model(input_ids=ids).logits, trainer._model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


async def test_merged_weights_load_as_plain_model(tiny_models: Path, executor: DeviceExecutor,
                                                  tmp_path: Path) -> None:
    trainer = LocalTrainer(model=load_causal_lm(tiny_models / "student", device=CPU, train=True), sampler=None,
                           executor=executor, pad_token_id=0, learning_rate=2e-2, lora=_spec("merged", ("all-linear",)))
    scorer = LocalScorer(name="trainer", model=trainer._model, executor=executor, pad_token_id=0)
    await _train_once(trainer, scorer)

    await trainer.save_weights(tmp_path / "merged")
    loaded = load_causal_lm(tmp_path / "merged", device=CPU)
    ids = torch.tensor([PROMPT + COMPLETION])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trainer._model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
async def test_adapter_directory_is_peft_format(tiny_models: Path, executor: DeviceExecutor, tmp_path: Path) -> None:
    from peft import PeftModel

    trainer = LocalTrainer(model=load_causal_lm(tiny_models / "student", device=CPU, train=True), sampler=None,
                           executor=executor, pad_token_id=0, learning_rate=2e-2, lora=_spec("adapter"))
    scorer = LocalScorer(name="trainer", model=trainer._model, executor=executor, pad_token_id=0)
    await _train_once(trainer, scorer)

    await trainer.save_weights(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    restored = PeftModel.from_pretrained(load_causal_lm(tiny_models / "student", device=CPU), tmp_path / "adapter")
    ids = torch.tensor([PROMPT + COMPLETION])
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, trainer._model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_unknown_target_module_is_reported(tiny_models: Path) -> None:
    with pytest.raises(ValueError, match="MOPD_LORA_TARGET_MODULES"):
        wrap_lora(load_causal_lm(tiny_models / "student", device=CPU), _spec("merged", ("no_such_proj",)))
