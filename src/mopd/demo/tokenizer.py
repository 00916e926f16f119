"""Byte-level tokenizer for the demo models.

Every UTF-8 byte is one token and there are no merges, so any text encodes
without unknown tokens and the vocabulary stays tiny. The ChatML-style chat
template starts with the BOS token, so the pipeline must encode a rendered
template with ``add_special_tokens=False``. Encoding with special tokens adds
a second BOS through the post-processor.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

BOS_TOKEN = "<|bos|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
"""End of a chat turn. It is also the EOS token, so completions end with it."""
PAD_TOKEN = "<|pad|>"

SPECIAL_TOKENS = (BOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN, PAD_TOKEN)
BYTE_VOCAB_SIZE = 256

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _byte_symbols() -> list[str]:
    """Return the printable symbol that byte-level pre-tokenization uses for each byte.

    Printable Latin-1 bytes stand for themselves. The remaining bytes map in
    order to code points from 256 up, which is the byte-level convention the
    ``tokenizers`` ``ByteLevel`` pre-tokenizer and decoder implement.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    symbols: list[str] = []
    next_code_point = 256
    for byte in range(BYTE_VOCAB_SIZE):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(next_code_point))
            next_code_point += 1
    return symbols


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Build the demo tokenizer: token id ``b`` is byte ``b``, special tokens follow."""
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    backend = Tokenizer(BPE(vocab=vocab, merges=[], fuse_unk=False))
    # use_regex=False keeps the text in one piece: without merges the split
    # into words changes nothing but costs time.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=IM_END_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START_TOKEN],
        chat_template=CHAT_TEMPLATE,
        # Left padding lines up the last prompt token of every row in a batch,
        # which batched generation needs.
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )


def save_tokenizer(*, directory: Path) -> PreTrainedTokenizerFast:
    """Build the tokenizer, save it into ``directory`` and return it."""
    tokenizer = build_tokenizer()
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return tokenizer
