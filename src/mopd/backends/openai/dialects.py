"""Request bodies and response parsing for the server dialects.

Dialects and the routes they use (field names as of vLLM 0.10/0.11, SGLang
0.4/0.5 and Fireworks' completions API):

    vllm       sample: POST /v1/completions, prompt as token ids, ``logprobs``,
                       ids from ``return_token_ids`` (``choices[].token_ids``)
                       or ``return_tokens_as_token_ids`` (tokens ``token_id:<id>``)
               score:  ``prompt_logprobs`` (``choices[].prompt_logprobs``: first
                       entry null, then ``{"<id>": {logprob, rank, decoded_token}}``)
                       or ``echo`` with ``max_tokens: 0``
    sglang     sample: POST /generate with ``input_ids`` and ``return_logprob``
                       (``meta_info.output_token_logprobs``: ``[logprob, id, text]``)
               score:  POST /generate with ``max_new_tokens: 0`` and
                       ``logprob_start_len`` (``meta_info.input_token_logprobs``), or the
                       OpenAI route with ``echo`` (its ``max_tokens`` must be > 0)
    fireworks  sample: POST /v1/completions with ``raw_output``
                       (``choices[].raw_output.completion_token_ids``)
               score:  ``echo`` + ``raw_output`` (``raw_output.prompt_token_ids``)

Alignment rules applied here, per completion: the ids a server echoes must be
the ids that were sent, the logprob list must have one entry per position,
and a missing, non-finite or clamped (<= -9999) logprob fails the sample. A
failure breaks only its own sample and carries one of the reason codes of the
advantage stage (``echo_mismatch``, ``length_mismatch``, ``nonfinite_logprob``,
``clamped_logprob``) or ``bad_response``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from mopd.backends.base import SamplingParams, ScoredCompletion
from mopd.errors import AlignmentError, BackendError
from mopd.types import Sample

log = structlog.get_logger(__name__)

Dialect = Literal["vllm", "sglang", "fireworks"]
ScoreMode = Literal["prompt_logprobs", "echo", "generate"]
TokenIdsMode = Literal["return_token_ids", "tokens_as_token_ids"]

# vLLM reports logprobs it clamped as -9999.0.
CLAMP_SENTINEL = -9999.0
TOKEN_ID_PREFIX = "token_id:"

DEFAULT_SCORE_MODE: dict[str, ScoreMode] = {"vllm": "prompt_logprobs", "sglang": "generate", "fireworks": "echo"}


@dataclass(frozen=True, slots=True)
class Wire:
    """Request and response shapes used with one deployment."""

    dialect: Dialect = "vllm"
    score_mode: ScoreMode = "prompt_logprobs"
    token_ids_mode: TokenIdsMode = "return_token_ids"

    def __post_init__(self) -> None:
        if self.dialect == "vllm" and self.score_mode == "generate":
            raise ValueError("score mode 'generate' is SGLang's native route; use prompt_logprobs or echo with vllm")
        if self.dialect == "fireworks" and self.score_mode != "echo":
            raise ValueError("Fireworks-style servers score with echo; set the score mode to echo or auto")


# --- sampling ------------------------------------------------------------------


def sample_request(
    wire: Wire, *, model: str, prompt_ids_T: Sequence[int], params: SamplingParams, adapter: str | None = None
) -> tuple[str, dict[str, Any]]:
    """Return the path and JSON body that ask for ``params.n`` completions.

    :param adapter: LoRA adapter name for SGLang's native route; None uses the base weights.
    """
    if wire.dialect == "sglang":
        sampling: dict[str, Any] = {"temperature": params.temperature, "max_new_tokens": params.max_tokens}
        if params.stop_token_ids:
            sampling["stop_token_ids"] = list(params.stop_token_ids)
        if params.seed is not None:
            sampling["sampling_seed"] = params.seed
        # One copy of the prompt per sample: a batch of n, answered as a list of n.
        body: dict[str, Any] = {
            "input_ids": [list(prompt_ids_T) for _ in range(params.n)],
            "sampling_params": sampling,
            "return_logprob": True,
        }
        if adapter is not None:
            body["lora_path"] = adapter
        return "/generate", body

    body = {
        "model": model,
        "prompt": list(prompt_ids_T),
        "n": params.n,
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        # 1, not 0: some servers treat 0 as "no logprobs". The sampled token's logprob is always included.
        "logprobs": 1,
    }
    if params.stop_token_ids:
        body["stop_token_ids"] = list(params.stop_token_ids)
    if params.seed is not None:
        body["seed"] = params.seed
    if wire.dialect == "fireworks":
        body["raw_output"] = True
    elif wire.token_ids_mode == "return_token_ids":
        body["return_token_ids"] = True
    else:
        body["return_tokens_as_token_ids"] = True
    return "/v1/completions", body


def parse_samples(wire: Wire, body: Any, *, n: int, policy_version: int, deployment: str) -> list[Sample]:
    """Turn a sampling response into ``n`` samples.

    A choice whose logprobs are missing, or fewer than its tokens, is kept with
    NaN logprobs or its short list, so the advantage stage rejects that sample
    alone (``nonfinite_logprob`` or ``length_mismatch``) and counts it.

    :raises BackendError: ``bad_response`` when the response has the wrong shape
        or number of choices, ``missing_token_ids`` when a choice carries no token ids.
    """
    if wire.dialect == "sglang":
        items = body if isinstance(body, list) else [body]
        choices = [_sglang_choice(item, deployment=deployment) for item in items]
    else:
        raw = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(raw, list):
            raise BackendError("bad_response", f"{deployment}: the completions response has no choices list")
        ordered = sorted(raw, key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
        choices = [_openai_choice(choice, deployment=deployment) for choice in ordered]
    if len(choices) != n:
        raise BackendError("bad_response", f"{deployment}: asked for {n} completions, the server returned {len(choices)}")

    samples = []
    for index, (ids_T, logprobs_T, finish_reason) in enumerate(choices):
        if logprobs_T is None:
            log.warning("student_logprobs_missing", deployment=deployment, choice=index, tokens=len(ids_T))
            logprobs_T = (math.nan,) * len(ids_T)
        elif len(logprobs_T) != len(ids_T):
            log.warning("student_logprobs_length_mismatch", deployment=deployment, choice=index,
                        tokens=len(ids_T), logprobs=len(logprobs_T))
        samples.append(Sample(completion_ids_T=ids_T, sampling_logprobs_T=logprobs_T,
                              finish_reason=finish_reason, policy_version=policy_version))
    return samples


def _openai_choice(choice: Any, *, deployment: str) -> tuple[tuple[int, ...], tuple[float, ...] | None, str]:
    if not isinstance(choice, dict):
        raise BackendError("bad_response", f"{deployment}: a completion choice is not an object")
    logprobs = choice.get("logprobs")
    token_logprobs = logprobs.get("token_logprobs") if isinstance(logprobs, dict) else None
    values_T = tuple(_as_float(v) for v in token_logprobs) if isinstance(token_logprobs, list) else None

    ids_T = _choice_ids(choice, logprobs)
    if ids_T is None:
        raise BackendError(
            "missing_token_ids",
            f"{deployment}: a completion choice carries no token ids; use a server that returns them "
            "(vLLM >= 0.10.2 with return_token_ids, or set MOPD_OPENAI_TOKEN_IDS=tokens_as_token_ids)",
        )
    return ids_T, values_T, _finish_reason(choice.get("finish_reason"))


def _choice_ids(choice: dict[str, Any], logprobs: Any) -> tuple[int, ...] | None:
    """Read completion token ids from the first field that carries them."""
    if isinstance(choice.get("token_ids"), list):
        return _as_ids(choice["token_ids"])
    raw_output = choice.get("raw_output")
    if isinstance(raw_output, dict) and isinstance(raw_output.get("completion_token_ids"), list):
        return _as_ids(raw_output["completion_token_ids"])
    if isinstance(logprobs, dict):
        if isinstance(logprobs.get("token_ids"), list):
            return _as_ids(logprobs["token_ids"])
        tokens = logprobs.get("tokens")
        if isinstance(tokens, list) and all(isinstance(t, str) and t.startswith(TOKEN_ID_PREFIX) for t in tokens):
            return _as_ids([t[len(TOKEN_ID_PREFIX):] for t in tokens])
    return None


def _sglang_choice(item: Any, *, deployment: str) -> tuple[tuple[int, ...], tuple[float, ...] | None, str]:
    meta = item.get("meta_info") if isinstance(item, dict) else None
    if not isinstance(meta, dict):
        raise BackendError("bad_response", f"{deployment}: a /generate result has no meta_info object")
    entries = meta.get("output_token_logprobs")
    output_ids = item.get("output_ids")
    if isinstance(entries, list):
        ids_T = _as_ids([_entry(e, deployment=deployment)[1] for e in entries])
        values_T: tuple[float, ...] | None = tuple(_as_float(_entry(e, deployment=deployment)[0]) for e in entries)
        if isinstance(output_ids, list) and _as_ids(output_ids) != ids_T:
            raise BackendError("bad_response", f"{deployment}: output_ids and output_token_logprobs disagree")
    elif isinstance(output_ids, list):
        ids_T, values_T = _as_ids(output_ids), None
    else:
        raise BackendError("missing_token_ids", f"{deployment}: a /generate result has neither output_ids "
                           "nor output_token_logprobs; send return_logprob")
    finish = meta.get("finish_reason")
    finish_type = finish.get("type") if isinstance(finish, dict) else finish
    return ids_T, values_T, _finish_reason(finish_type)


def _finish_reason(value: Any) -> str:
    # Servers name a stop token, a stop string and EOS differently; the pipeline
    # only tells "cut at max_tokens" apart from the rest.
    return "length" if value == "length" else "stop"


# --- scoring -------------------------------------------------------------------


TOPK_SCORE_MODES = ("prompt_logprobs", "generate")
"""Score modes that return top-K candidates per prompt position with their token ids."""


def score_request(
    wire: Wire, *, model: str, prompt_ids_T: Sequence[int], completion_ids_T: Sequence[int], top_k: int = 0
) -> tuple[str, dict[str, Any]]:
    """Return the path and JSON body that score ``completion_ids_T`` after ``prompt_ids_T``.

    :param top_k: also ask for the ``top_k`` most likely ids at every position
        (score modes ``prompt_logprobs`` and ``generate`` only).
    """
    sequence = list(prompt_ids_T) + list(completion_ids_T)
    if top_k and wire.score_mode not in TOPK_SCORE_MODES:
        raise ValueError(f"score mode {wire.score_mode!r} returns no top-K ids; use one of {TOPK_SCORE_MODES}")
    if wire.score_mode == "generate":
        body = {
            "input_ids": sequence,
            "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
            "return_logprob": True,
            "logprob_start_len": sglang_start(len(prompt_ids_T)),
        }
        if top_k:
            body["top_logprobs_num"] = top_k
        return "/generate", body
    if wire.score_mode == "prompt_logprobs":
        # vLLM returns the top prompt_logprobs ids per position plus the sent id when it is not among them.
        return "/v1/completions", {
            "model": model, "prompt": sequence, "max_tokens": 1, "temperature": 1.0,
            "prompt_logprobs": top_k, "return_token_ids": True,
        }
    body: dict[str, Any] = {
        "model": model, "prompt": sequence, "echo": True, "logprobs": 1, "temperature": 1.0,
        # vLLM scores the prompt alone with max_tokens 0; SGLang and Fireworks need
        # at least one generated token, which the parser drops.
        "max_tokens": 0 if wire.dialect == "vllm" else 1,
    }
    if wire.dialect == "vllm":
        body["return_tokens_as_token_ids"] = True
    elif wire.dialect == "fireworks":
        body["raw_output"] = True
    return "/v1/completions", body


def sglang_start(prompt_length: int) -> int:
    """``logprob_start_len`` for scoring: the last prompt position, so the first
    entry checks one prompt id and every later entry scores a completion token."""
    return max(prompt_length - 1, 0)


def parse_score(
    wire: Wire,
    body: Any,
    *,
    prompt_ids_T: Sequence[int],
    completion_ids_T: Sequence[int],
    deployment: str,
    top_k: int = 0,
) -> ScoredCompletion:
    """Read one logprob per completion token from a scoring response and check it.

    :param top_k: also read the ``top_k`` candidates at every completion position.
    """
    sequence = tuple(prompt_ids_T) + tuple(completion_ids_T)
    try:
        if wire.score_mode == "generate":
            start, echoed, values = _read_sglang_input(body, sequence=sequence, prompt_length=len(prompt_ids_T))
        elif wire.score_mode == "prompt_logprobs":
            start, echoed, values = _read_prompt_logprobs(body, sequence=sequence)
        else:
            start, echoed, values = _read_echo(body, sequence=sequence)
        logprobs_T = check_positions(sequence=sequence, start=start, echoed_ids=echoed, logprobs=values,
                                     prompt_length=len(prompt_ids_T))
        topk_ids = topk_logprobs = None
        if top_k:
            topk_ids, topk_logprobs = _read_topk(wire, body, prompt_length=len(prompt_ids_T),
                                                 count=len(completion_ids_T), top_k=top_k)
    except AlignmentError as exc:
        log.warning("teacher_response_rejected", deployment=deployment, reason=exc.reason, error=str(exc))
        return ScoredCompletion(logprobs_T=None, failure=exc.reason)
    return ScoredCompletion(logprobs_T=logprobs_T, echoed_ids_T=tuple(completion_ids_T), topk_ids_TK=topk_ids,
                            topk_logprobs_TK=topk_logprobs)


def _read_topk(
    wire: Wire, body: Any, *, prompt_length: int, count: int, top_k: int
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[float, ...], ...]]:
    """Read the ``top_k`` most likely ids and logprobs at each of the ``count`` completion positions.

    :raises AlignmentError: missing_topk when a position has no candidates.
    """
    rows: list[list[tuple[int, float]]] = []
    if wire.score_mode == "prompt_logprobs":
        choice = _first_choice(body)
        entries = choice.get("prompt_logprobs")
        if entries is None:
            entries = body.get("prompt_logprobs")
        for entry in (entries or [])[prompt_length:prompt_length + count]:
            if not isinstance(entry, dict):
                raise AlignmentError("missing_topk", "a completion position of prompt_logprobs has no candidates")
            # Entries hold the top prompt_logprobs ids (ranks 1..k) and the sent id, whatever its rank.
            ranked = sorted(
                ((v.get("rank", 0), int(k), _as_float(v.get("logprob"))) for k, v in entry.items() if isinstance(v, dict)),
            )
            rows.append([(token_id, value) for rank, token_id, value in ranked if rank <= top_k][:top_k])
    else:
        item = body[0] if isinstance(body, list) and body else body
        meta = item.get("meta_info") if isinstance(item, dict) else None
        entries = meta.get("input_top_logprobs") if isinstance(meta, dict) else None
        # Entries start at logprob_start_len (the last prompt position), so entry j + 1 is completion token j.
        for entry in (entries or [])[1:1 + count]:
            if not isinstance(entry, list) or not entry:
                raise AlignmentError("missing_topk", "a completion position of input_top_logprobs has no candidates")
            candidates = [_entry(e, deployment="teacher", error=AlignmentError) for e in entry]
            rows.append([(int(token_id), _as_float(value)) for value, token_id in candidates][:top_k])
    if len(rows) != count or any(not row for row in rows):
        raise AlignmentError("missing_topk", f"expected top-K candidates at {count} completion positions, "
                             f"the server returned {len(rows)}")
    return (tuple(tuple(i for i, _ in row) for row in rows), tuple(tuple(v for _, v in row) for row in rows))


def check_positions(
    *,
    sequence: tuple[int, ...],
    start: int,
    echoed_ids: Sequence[int] | None,
    logprobs: Sequence[float | None],
    prompt_length: int,
) -> tuple[float, ...]:
    """Check a per-position response against the sent ids and return the completion logprobs.

    ``logprobs[k]`` (and ``echoed_ids[k]``) belong to ``sequence[start + k]``.

    :raises AlignmentError: echo_mismatch, length_mismatch, nonfinite_logprob or clamped_logprob.
    """
    expected = len(sequence) - start
    if echoed_ids is not None and tuple(echoed_ids) != sequence[start:]:
        raise AlignmentError("echo_mismatch", f"the server echoed {len(echoed_ids)} ids that differ from the "
                             f"{expected} ids sent from position {start}")
    if len(logprobs) != expected:
        raise AlignmentError("length_mismatch", f"expected {expected} logprobs from position {start}, "
                             f"the server returned {len(logprobs)}")
    completion_T = tuple(logprobs[prompt_length - start:])
    for value in completion_T:
        if value is None or not math.isfinite(value):
            raise AlignmentError("nonfinite_logprob", f"a completion logprob is {value!r}")
        if value <= CLAMP_SENTINEL:
            raise AlignmentError("clamped_logprob", f"a completion logprob is the clamping sentinel {value!r}")
    return completion_T


def _first_choice(body: Any) -> dict[str, Any]:
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise AlignmentError("bad_response", "the scoring response has no choices")
    return choices[0]


def _read_prompt_logprobs(body: Any, *, sequence: tuple[int, ...]) -> tuple[int, list[int] | None, list[float | None]]:
    choice = _first_choice(body)
    entries = choice.get("prompt_logprobs")
    if entries is None:
        entries = body.get("prompt_logprobs")
    if not isinstance(entries, list):
        raise AlignmentError("nonfinite_logprob", "the scoring response has no prompt_logprobs list")
    echoed = choice.get("prompt_token_ids")
    if echoed is None:
        echoed = body.get("prompt_token_ids")
    echoed_ids = list(_as_ids(echoed)) if isinstance(echoed, list) else None

    values: list[float | None] = []
    for position, entry in enumerate(entries):
        if position == 0:
            values.append(None)  # nothing predicts the first token
            continue
        if position >= len(sequence) or not isinstance(entry, dict):
            values.append(None)
            continue
        # Entries are keyed by token id and always include the token at this position.
        found = entry.get(str(sequence[position]))
        if found is None:
            raise AlignmentError("echo_mismatch", f"prompt_logprobs at position {position} has no entry for the "
                                 f"sent id {sequence[position]}")
        values.append(_as_float(found.get("logprob") if isinstance(found, dict) else found))
    return 0, echoed_ids, values


def _read_echo(body: Any, *, sequence: tuple[int, ...]) -> tuple[int, list[int] | None, list[float | None]]:
    choice = _first_choice(body)
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict) or not isinstance(logprobs.get("token_logprobs"), list):
        raise AlignmentError("nonfinite_logprob", "the echo response has no logprobs.token_logprobs list")
    # The echoed prompt comes first; anything after it was generated and is dropped.
    count = len(sequence)
    values = [_as_float(v) for v in logprobs["token_logprobs"][:count]]

    echoed_ids: list[int] | None = None
    raw_output = choice.get("raw_output")
    if isinstance(raw_output, dict) and isinstance(raw_output.get("prompt_token_ids"), list):
        echoed_ids = list(_as_ids(raw_output["prompt_token_ids"]))
    elif isinstance(choice.get("prompt_token_ids"), list):
        echoed_ids = list(_as_ids(choice["prompt_token_ids"]))
    else:
        tokens = logprobs.get("tokens")
        if isinstance(tokens, list) and tokens and all(isinstance(t, str) and t.startswith(TOKEN_ID_PREFIX)
                                                       for t in tokens):
            echoed_ids = list(_as_ids([t[len(TOKEN_ID_PREFIX):] for t in tokens[:count]]))
    return 0, echoed_ids, values


def _read_sglang_input(
    body: Any, *, sequence: tuple[int, ...], prompt_length: int
) -> tuple[int, list[int] | None, list[float | None]]:
    item = body[0] if isinstance(body, list) and body else body
    meta = item.get("meta_info") if isinstance(item, dict) else None
    entries = meta.get("input_token_logprobs") if isinstance(meta, dict) else None
    if not isinstance(entries, list):
        raise AlignmentError("nonfinite_logprob", "the /generate response has no meta_info.input_token_logprobs")
    ids: list[int] = []
    values: list[float | None] = []
    for entry in entries:
        value, token_id = _entry(entry, deployment="teacher", error=AlignmentError)
        ids.append(int(token_id) if token_id is not None else -1)
        values.append(_as_float(value))
    return sglang_start(prompt_length), ids, values


# --- helpers -------------------------------------------------------------------


def _entry(entry: Any, *, deployment: str, error: type[Exception] = BackendError) -> tuple[Any, Any]:
    """Split an SGLang ``[logprob, token_id, text]`` entry."""
    if not isinstance(entry, (list, tuple)) or len(entry) < 2:
        if error is AlignmentError:
            raise AlignmentError("bad_response", f"a logprob entry is {entry!r}, expected [logprob, token_id, text]")
        raise BackendError("bad_response", f"{deployment}: a logprob entry is {entry!r}, expected [logprob, id, text]")
    return entry[0], entry[1]


def _as_float(value: Any) -> float:
    """A logprob as a float; None and non-numbers become NaN so they fail the finiteness check."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _as_ids(values: Sequence[Any]) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise BackendError("bad_response", f"token ids are not integers: {exc}") from exc
