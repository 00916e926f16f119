"""Chat-template rendering and encoding, shared by the sampler and the scorers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mopd.errors import ConfigError


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory; never reaches a model hub."""
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"tokenizer directory {str(directory)!r} does not exist; point the setting at a local directory")
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"tokenizer in {str(directory)!r} has no chat_template; add one to tokenizer_config.json "
            "so prompts render the way the model was trained"
        )
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"tokenizer in {str(directory)!r} has no eos_token; set one so completions can stop")
    return tokenizer


class PromptRenderer:
    """Renders chat messages once, with the generation prompt, into token ids.

    Encoding uses ``add_special_tokens=False`` because the template already
    writes the BOS token when the model has one. Adding special tokens again
    would put a second BOS in front.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id: int = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_token_id: int = pad if pad is not None else tokenizer.eos_token_id

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)

    def encode(self, messages: Sequence[dict[str, Any]]) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(self.render(messages), add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)
