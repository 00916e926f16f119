"""Prompt rendering: the chat template is rendered once and encoded without extra special tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from mopd.errors import ConfigError
from mopd.tokenization import PromptRenderer, load_tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Solve 12 + 30."}]


@pytest.fixture
def renderer(tiny_models: Path) -> PromptRenderer:
    return PromptRenderer(load_tokenizer(tiny_models / "student"))


def test_prompt_has_exactly_one_bos(renderer: PromptRenderer) -> None:
    bos = renderer.tokenizer.bos_token_id
    ids = renderer.encode(MESSAGES)
    assert bos is not None
    assert ids[0] == bos
    assert ids.count(bos) == 1


def test_adding_special_tokens_would_double_bos(renderer: PromptRenderer) -> None:
    # Guards the choice of add_special_tokens=False: the template already writes BOS.
    text = renderer.render(MESSAGES)
    doubled = renderer.tokenizer.encode(text, add_special_tokens=True)
    assert doubled.count(renderer.tokenizer.bos_token_id) == 2


def test_prompt_ends_with_generation_prompt(renderer: PromptRenderer) -> None:
    assert renderer.render(MESSAGES).endswith("<|im_start|>assistant\n")


def test_encoding_is_stable_across_loads(tiny_models: Path, renderer: PromptRenderer) -> None:
    again = PromptRenderer(AutoTokenizer.from_pretrained(tiny_models / "math-teacher"))
    assert again.encode(MESSAGES) == renderer.encode(MESSAGES)


def test_tokenizer_without_chat_template_is_rejected(tiny_models: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "tokenizer")
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="has no chat_template"):
        load_tokenizer(tmp_path)


def test_missing_tokenizer_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tmp_path / "absent")
