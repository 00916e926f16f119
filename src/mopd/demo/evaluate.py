"""Greedy exact-match accuracy of a demo model on JSONL rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from mopd.demo.tasks import is_correct


def render_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Render the chat template once and encode it without adding special tokens.

    The template already starts with BOS, so ``add_special_tokens=False``
    keeps exactly one BOS in the ids.
    """
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def greedy_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> list[str]:
    """Return the greedy completion text of each row, special tokens removed."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    pad_id = tokenizer.pad_token_id
    generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    was_training = model.training
    model.eval()
    texts: list[str] = []
    try:
        for start in range(0, len(rows), batch_size):
            prompts = [render_prompt_ids(tokenizer, row["messages"]) for row in rows[start : start + batch_size]]
            width = max(len(ids) for ids in prompts)
            # Left padding puts every prompt's last token in the same column, so
            # new tokens of all rows are appended at one position.
            input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in prompts])
            attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config
            )
            texts.extend(tokenizer.batch_decode(output[:, width:], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return texts


def greedy_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> float:
    """Return the share of rows whose greedy completion has the expected final answer.

    Returns 0.0 for no rows.
    """
    if not rows:
        return 0.0
    texts = greedy_completions(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size)
    correct = sum(is_correct(text, str(row["expected_answer"])) for text, row in zip(texts, rows, strict=True))
    return correct / len(rows)
