"""Tiny Qwen2 models for the demo and the supervised training that makes them.

Teachers are trained as specialists on their own route and the student
briefly on both routes, so the teachers are accurate and the student is weak
but has something to learn from them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from mopd.demo.evaluate import render_prompt_ids
from mopd.demo.tasks import Problem

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ModelShape:
    """Size of a demo model."""

    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 256


@dataclass(frozen=True, slots=True)
class TrainingPlan:
    """Supervised training settings for one model."""

    steps: int
    """Maximum steps. Training stops earlier once its accuracy target is met."""
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    seed: int = 0


def build_model(*, tokenizer: PreTrainedTokenizerBase, shape: ModelShape, seed: int) -> Qwen2ForCausalLM:
    """Build a randomly initialized model whose vocabulary matches ``tokenizer``."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_attention_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
        max_new_tokens=16,
    )
    return model


def save_model(*, model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """Save weights as safetensors plus the tokenizer files, so the directory loads on its own."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))


@dataclass(frozen=True, slots=True)
class _Example:
    input_ids: tuple[int, ...]
    prompt_length: int


def _encode_examples(tokenizer: PreTrainedTokenizerBase, problems: Sequence[Problem]) -> list[_Example]:
    examples = []
    for problem in problems:
        prompt = render_prompt_ids(tokenizer, problem.messages())
        completion = tokenizer(problem.completion, add_special_tokens=False)["input_ids"]
        examples.append(
            _Example(input_ids=tuple(prompt + completion + [tokenizer.eos_token_id]), prompt_length=len(prompt))
        )
    return examples


def _collate(examples: Sequence[_Example], *, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Right padding keeps position ids starting at 0 in every row. transformers'
    # generate derives the same ids from the attention mask of a left-padded batch.
    width = max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids)
        attention_mask[row, :length] = 1
        # Only completion tokens (EOS included) carry loss.
        labels[row, example.prompt_length : length] = input_ids[row, example.prompt_length : length]
    return input_ids, attention_mask, labels


def _learning_rate(plan: TrainingPlan, step: int) -> float:
    # Linear warmup, then constant: the run length is not known in advance
    # because training stops once the held-back accuracy target is met.
    if step < plan.warmup_steps:
        return plan.learning_rate * (step + 1) / plan.warmup_steps
    return plan.learning_rate


@dataclass(frozen=True, slots=True)
class TrainingResult:
    """Outcome of a supervised run."""

    steps: int
    last_loss: float
    seconds: float


def train_supervised(
    *,
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    problems_by_route: Mapping[str, Sequence[Problem]],
    plan: TrainingPlan,
    name: str,
    check_every: int,
    active_routes: Callable[[int], Collection[str]],
    log_progress: bool = True,
) -> TrainingResult:
    """Train ``model`` with next-token cross-entropy on completion tokens.

    Each batch splits evenly across the routes still active, each route's
    problems drawn in an order fixed by ``plan.seed``. Every ``check_every``
    steps ``active_routes(step)`` returns the routes to train next (a route
    may leave the mix and come back), and
    training stops when it returns none or after ``plan.steps`` steps. With a
    fixed torch thread count the result depends only on the inputs.
    """
    if not problems_by_route or not all(problems_by_route.values()):
        raise ValueError("train_supervised needs at least one problem per route")
    if check_every < 1:
        raise ValueError(f"check_every must be at least 1, got {check_every}")
    examples = {route: _encode_examples(tokenizer, problems) for route, problems in problems_by_route.items()}
    orders: dict[str, list[int]] = {route: [] for route in examples}
    rng = random.Random(plan.seed)
    torch.manual_seed(plan.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=plan.learning_rate, weight_decay=plan.weight_decay, betas=(0.9, 0.98)
    )
    active = [route for route in examples]
    loss_value = float("nan")
    started = time.monotonic()
    step = 0
    model.train()
    while step < plan.steps and active:
        batch: list[_Example] = []
        for index, route in enumerate(active):
            share = plan.batch_size // len(active) + (1 if index < plan.batch_size % len(active) else 0)
            order = orders[route]
            while len(order) < share:
                refill = list(range(len(examples[route])))
                rng.shuffle(refill)
                order.extend(refill)
            batch.extend(examples[route][position] for position in order[:share])
            del order[:share]
        input_ids, attention_mask, labels = _collate(batch, pad_id=tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(plan, step)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        # Position t predicts token t + 1.
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_value = float(loss.detach())
        step += 1
        if step % check_every == 0:
            model.eval()
            keep = set(active_routes(step))
            model.train()
            active = [route for route in examples if route in keep]
            if log_progress:
                log.debug(
                    "demo_training_progress",
                    model=name,
                    step=step,
                    loss=round(loss_value, 4),
                    active_routes=active,
                    seconds=round(time.monotonic() - started, 1),
                )
    model.eval()
    return TrainingResult(steps=step, last_loss=loss_value, seconds=time.monotonic() - started)
