"""Chat-template rendering and encoding, shared by the sampler and the scorers."""

from __future__ import annotations

import hashlib
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


SPECIAL_TOKEN_NAMES = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


def vocabulary_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Return a SHA-256 digest of the vocabulary (token -> id pairs, added tokens included)."""
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256()
    for token, token_id in vocabulary:
        digest.update(f"{token_id}\t{token}\n".encode())
    return digest.hexdigest()


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int | None]:
    """Return the ids of BOS, EOS, PAD and UNK (None when the tokenizer has none)."""
    return {name.removesuffix("_id"): getattr(tokenizer, name, None) for name in SPECIAL_TOKEN_NAMES}


def check_teacher_tokenizer(student_dir: str | Path, teacher_dir: str | Path, *, route: str) -> None:
    """Compare the tokenizer a teacher declares with the student's.

    Token ids travel between student and teacher unchanged, so both must map
    every id to the same text and agree on the special tokens.

    :raises ConfigError: naming both directories and what differs.
    """
    student = load_tokenizer(student_dir)
    teacher = load_tokenizer(teacher_dir)
    differences = []
    student_print, teacher_print = vocabulary_fingerprint(student), vocabulary_fingerprint(teacher)
    if student_print != teacher_print:
        differences.append(
            f"vocabulary fingerprint {teacher_print[:12]} ({len(teacher)} tokens) vs the student's "
            f"{student_print[:12]} ({len(student)} tokens)"
        )
    student_special, teacher_special = special_token_ids(student), special_token_ids(teacher)
    for name, student_id in student_special.items():
        if teacher_special[name] != student_id:
            differences.append(f"{name} id {teacher_special[name]} vs the student's {student_id}")
    if differences:
        raise ConfigError(
            f"teacher for route {route!r} declares the tokenizer in {str(teacher_dir)!r}, which differs from the "
            f"student's tokenizer in {str(student_dir)!r}: {'; '.join(differences)}. Student and teachers must "
            "share one tokenizer, because token ids pass between them unchanged"
        )


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
