"""LoRA for the local trainer, on peft.

The trainer and the in-process sampler keep a transformers model into which
peft has injected LoRA layers (``PeftModel.get_base_model()``), so both run
the plain transformers forward and generation code. Weights reach a sampler
in one of two forms:

- ``merged``: base weights plus ``scale * B @ A`` under the base model's
  parameter names, computed without changing the trainer's model. Any
  sampler or server that loads full weights accepts them.
- ``adapter``: only the LoRA matrices. On disk this is a peft adapter
  directory (``adapter_config.json`` and ``adapter_model.safetensors``), the
  form vLLM's ``/v1/load_lora_adapter`` loads.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import PreTrainedModel

LORA_KEY = "lora_"
BASE_LAYER = ".base_layer"


@dataclass(frozen=True, slots=True)
class LoraSpec:
    """LoRA shape and how its weights are published."""

    rank: int
    alpha: float
    """Scale numerator: the update is ``alpha / rank * B @ A``."""
    target_modules: tuple[str, ...]
    """Module names (or the one entry ``all-linear``) that get LoRA matrices."""
    publish: Literal["merged", "adapter"] = "merged"


def wrap_lora(model: PreTrainedModel, spec: LoraSpec, *, seed: int = 0) -> PreTrainedModel:
    """Inject LoRA layers into ``model`` and return the peft wrapper (a ``PeftModel``).

    Only the LoRA matrices require gradients. ``B`` starts at zero, so the
    wrapped model computes exactly what ``model`` did.
    """
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = "all-linear" if spec.target_modules == ("all-linear",) else list(spec.target_modules)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=targets, lora_dropout=0.0,
                        bias="none", task_type="CAUSAL_LM")
    # peft draws the A matrices from torch's global generator; seed it so runs repeat.
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 reads an attribute that transformers 5 deprecated; the warning is theirs, not ours.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        torch.manual_seed(seed)
        try:
            return get_peft_model(model, config)
        except ValueError as exc:
            raise ValueError(
                f"LoRA target modules {list(spec.target_modules)} do not match the model's modules ({exc}); "
                "set MOPD_LORA_TARGET_MODULES to names such as q_proj,v_proj or to all-linear"
            ) from exc


def adapter_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return the LoRA matrices of a model with injected LoRA layers, under its own parameter names."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if LORA_KEY in name}


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return full weights under the base model's names: base weight plus each LoRA update.

    ``model`` is the transformers model with injected LoRA layers; it is not changed.
    """
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                delta = module.get_delta_weight(adapter)
                key = f"{module_name}.weight"
                deltas[key] = deltas[key] + delta if key in deltas else delta

    merged: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if LORA_KEY in name:
            continue
        base_name = name.replace(BASE_LAYER, "")
        value = tensor.detach().clone()
        if base_name in deltas:
            value += deltas[base_name].to(value.dtype)
        merged[base_name] = value
    return merged


def save_lora_weights(peft_model: torch.nn.Module, directory: Path, *, publish: Literal["merged", "adapter"]) -> None:
    """Write the adapter directory or the merged save_pretrained directory to ``directory``."""
    if publish == "adapter":
        peft_model.save_pretrained(str(directory), safe_serialization=True)
        return
    base = peft_model.get_base_model()
    base.save_pretrained(str(directory), state_dict=merged_state_dict(base), safe_serialization=True)


def parse_target_modules(value: Sequence[str]) -> tuple[str, ...]:
    """Normalise the target-module list: stripped names, no empty entries."""
    names = tuple(name.strip() for name in value if name.strip())
    if not names:
        raise ValueError("the LoRA target-module list is empty; name modules such as q_proj,v_proj or all-linear")
    return names
