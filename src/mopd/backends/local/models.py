"""Student sampler, teacher scorer and trainer on in-process transformers models.

Shapes: ``B`` sequences in a batch, ``L`` padded sequence length, ``V``
vocabulary size.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Protocol

import structlog
import torch
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from mopd.backends.base import SamplingParams, ScoredCompletion
from mopd.backends.local.executor import DeviceExecutor
from mopd.backends.local.lora import LoraSpec, adapter_state_dict, merged_state_dict, save_lora_weights, wrap_lora
from mopd.errors import ConfigError
from mopd.types import Datum, Sample, StepResult

log = structlog.get_logger(__name__)


def resolve_device(name: str) -> torch.device:
    """Map ``auto``/``cpu``/``cuda[:N]`` to a torch device, checking that it exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"MOPD_DEVICE={name!r} but torch sees no CUDA device; set MOPD_DEVICE=cpu or auto")
    return device


def load_causal_lm(path: str | Path, *, device: torch.device, train: bool = False) -> PreTrainedModel:
    """Load a local transformers model directory (no hub access)."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise ConfigError(
            f"model directory {str(directory)!r} has no config.json; point the model setting at a directory "
            "written by save_pretrained (the local backend never downloads)"
        )
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    model.to(device)
    model.train(train)
    return model


# --- sampling ------------------------------------------------------------------


def _cache_kwarg(model: PreTrainedModel) -> str:
    # transformers renamed ``past_key_values`` to ``cache`` in 5.x and warns on the old name.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def generate(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_tokens: int,
    temperature: float,
    stop_token_ids: Sequence[int],
    pad_token_id: int,
    generator: torch.Generator | None,
) -> list[tuple[list[int], list[float], str]]:
    """Sample one completion per prompt with a KV cache.

    Returns, per prompt, the sampled ids (a stop token included when sampled),
    the log probability of each under the distribution it was drawn from
    (after temperature; the raw distribution when ``temperature == 0``, which
    is greedy), and the finish reason.
    """
    device = next(model.parameters()).device
    batch = len(prompts)
    width = max(len(p) for p in prompts)

    # 1. Left-pad the prompts so every row's next token sits in the last column.
    input_ids_BL = torch.full((batch, width), pad_token_id, dtype=torch.long, device=device)
    attention_BL = torch.zeros((batch, width), dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):
        input_ids_BL[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long, device=device)
        attention_BL[i, width - len(prompt):] = 1
    position_BL = (attention_BL.cumsum(-1) - 1).clamp(min=0)
    stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)

    # 2. Prefill.
    cache = {_cache_kwarg(model): DynamicCache()}
    out = model(
        input_ids=input_ids_BL, attention_mask=attention_BL, position_ids=position_BL,
        use_cache=True, logits_to_keep=1, **cache,
    )
    logits_BV = out.logits[:, -1, :].float()
    next_position_B = position_BL[:, -1] + 1

    # 3. Decode until every row has produced a stop token or max_tokens.
    tokens: list[torch.Tensor] = []
    logprobs: list[torch.Tensor] = []
    lengths_B = torch.zeros(batch, dtype=torch.long, device=device)
    finished_B = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_tokens):
        if temperature > 0:
            logp_BV = torch.log_softmax(logits_BV / temperature, dim=-1)
            token_B = torch.multinomial(logp_BV.exp(), 1, generator=generator).squeeze(1)
        else:
            logp_BV = torch.log_softmax(logits_BV, dim=-1)
            token_B = logp_BV.argmax(dim=-1)
        tokens.append(token_B)
        logprobs.append(logp_BV.gather(1, token_B[:, None]).squeeze(1))
        lengths_B += (~finished_B).long()
        finished_B |= torch.isin(token_B, stop_ids)
        if bool(finished_B.all()):
            break

        attention_BL = torch.cat([attention_BL, torch.ones((batch, 1), dtype=torch.long, device=device)], dim=1)
        out = model(
            input_ids=token_B[:, None], attention_mask=attention_BL, position_ids=next_position_B[:, None],
            use_cache=True, **cache,
        )
        next_position_B = next_position_B + 1
        logits_BV = out.logits[:, -1, :].float()

    # 4. Cut each row at its own length: exactly the ids that were sampled.
    token_BT = torch.stack(tokens, dim=1).tolist()
    logprob_BT = torch.stack(logprobs, dim=1).tolist()
    results = []
    for i in range(batch):
        n = int(lengths_B[i])
        reason = "stop" if bool(finished_B[i]) else "length"
        results.append((token_BT[i][:n], logprob_BT[i][:n], reason))
    return results


class LocalSampler:
    """Student sampler on an in-process model; batches concurrent requests."""

    def __init__(
        self,
        *,
        model: PreTrainedModel,
        executor: DeviceExecutor,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        seed: int = 0,
        name: str = "student",
    ) -> None:
        self.name = name
        self._model = model
        self._executor = executor
        self._eos_token_ids = tuple(eos_token_ids)
        self._pad_token_id = pad_token_id
        device = next(model.parameters()).device
        self._generator = torch.Generator(device=device).manual_seed(seed)
        self._version = 0

    @property
    def policy_version(self) -> int:
        return self._version

    async def sample(self, prompt_ids_T: Sequence[int], params: SamplingParams) -> list[Sample]:
        if not prompt_ids_T:
            raise ValueError("cannot sample from an empty prompt")
        key = ("sample", id(self), params.temperature, params.max_tokens, params.stop_token_ids)
        return await self._executor.submit(
            key=key, run=self._sample_batch, payload=(tuple(prompt_ids_T), params), size=params.n
        )

    def _sample_batch(self, payloads: list[tuple[tuple[int, ...], SamplingParams]]) -> list[list[Sample]]:
        params = payloads[0][1]
        prompts = [prompt for prompt, p in payloads for _ in range(p.n)]
        version = self._version
        results = generate(
            self._model, prompts, max_tokens=params.max_tokens, temperature=params.temperature,
            stop_token_ids=self._eos_token_ids + params.stop_token_ids, pad_token_id=self._pad_token_id,
            generator=self._generator,
        )
        grouped: list[list[Sample]] = []
        cursor = 0
        for _, p in payloads:
            grouped.append([
                Sample(
                    completion_ids_T=tuple(ids), sampling_logprobs_T=tuple(lps), finish_reason=reason,
                    policy_version=version,
                )
                for ids, lps, reason in results[cursor:cursor + p.n]
            ])
            cursor += p.n
        return grouped

    def load_weights(self, state_dict: dict[str, torch.Tensor], *, version: int, strict: bool = True) -> None:
        """Copy new weights in. Call it on the device thread, so that no batch runs on half-copied weights.

        :param strict: False loads a subset, such as only the LoRA matrices.
        """
        result = self._model.load_state_dict(state_dict, strict=strict)
        if not strict and result.unexpected_keys:
            raise ValueError(f"the sampler's model has no parameters {result.unexpected_keys[:3]} ...; "
                             "trainer and sampler must have the same LoRA layout")
        self._version = version

    async def aclose(self) -> None:
        return None


# --- scoring -------------------------------------------------------------------


@torch.inference_mode()
def completion_logprobs(
    model: PreTrainedModel, sequences: Sequence[tuple[Sequence[int], Sequence[int]]], *, pad_token_id: int
) -> list[list[float]]:
    """Return, per (prompt, completion), the logprob of each completion token
    given every token before it."""
    return [logprobs for logprobs, _, _ in completion_scores(model, sequences, pad_token_id=pad_token_id)]


@torch.inference_mode()
def completion_scores(
    model: PreTrainedModel,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    pad_token_id: int,
    top_k: int = 0,
) -> list[tuple[list[float], list[list[int]] | None, list[list[float]] | None]]:
    """Return, per (prompt, completion), the logprob of each completion token
    given every token before it and, when ``top_k`` > 0, the ``top_k`` most
    likely ids and their logprobs at each completion position."""
    device = next(model.parameters()).device
    full = [list(prompt) + list(completion) for prompt, completion in sequences]
    width = max(len(s) for s in full)
    input_ids_BL = torch.full((len(full), width), pad_token_id, dtype=torch.long, device=device)
    attention_BL = torch.zeros_like(input_ids_BL)
    for i, seq in enumerate(full):
        input_ids_BL[i, :len(seq)] = torch.tensor(seq, dtype=torch.long, device=device)
        attention_BL[i, :len(seq)] = 1
    logits_BLV = model(input_ids=input_ids_BL, attention_mask=attention_BL).logits.float()
    logp_BLV = torch.log_softmax(logits_BLV, dim=-1)

    results: list[tuple[list[float], list[list[int]] | None, list[list[float]] | None]] = []
    for i, (prompt, completion) in enumerate(sequences):
        if not completion:
            results.append(([], [] if top_k else None, [] if top_k else None))
            continue
        # Position p predicts token p + 1, so completion token j is read at len(prompt) + j - 1.
        start = len(prompt) - 1
        positions = torch.arange(start, start + len(completion), device=device)
        targets = torch.tensor(list(completion), dtype=torch.long, device=device)
        logprobs = logp_BLV[i, positions, targets].tolist()
        if not top_k:
            results.append((logprobs, None, None))
            continue
        top_values_TK, top_ids_TK = logp_BLV[i, positions].topk(min(top_k, logp_BLV.shape[-1]), dim=-1)
        results.append((logprobs, top_ids_TK.tolist(), top_values_TK.tolist()))
    return results


class LocalScorer:
    """Teacher scorer on an in-process model; batches concurrent requests."""

    def __init__(self, *, name: str, model: PreTrainedModel, executor: DeviceExecutor, pad_token_id: int) -> None:
        self.name = name
        self._model = model
        self._executor = executor
        self._pad_token_id = pad_token_id

    async def score(
        self, prompt_ids_T: Sequence[int], completions_S: Sequence[Sequence[int]], *, top_k: int = 0
    ) -> list[ScoredCompletion]:
        if not prompt_ids_T:
            raise ValueError("cannot score after an empty prompt")
        payload = (tuple(prompt_ids_T), tuple(tuple(c) for c in completions_S))
        return await self._executor.submit(
            key=("score", id(self), top_k), run=lambda payloads: self._score_batch(payloads, top_k=top_k),
            payload=payload, size=len(completions_S),
        )

    def _score_batch(
        self, payloads: list[tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]], *, top_k: int = 0
    ) -> list[list[ScoredCompletion]]:
        sequences = [(prompt, completion) for prompt, completions in payloads for completion in completions]
        scores = completion_scores(self._model, sequences, pad_token_id=self._pad_token_id, top_k=top_k)
        grouped = []
        cursor = 0
        for prompt, completions in payloads:
            group = []
            for (lps, top_ids, top_lps), completion in zip(scores[cursor:cursor + len(completions)], completions,
                                                            strict=True):
                group.append(ScoredCompletion(
                    logprobs_T=tuple(lps), echoed_ids_T=completion,
                    topk_ids_TK=None if top_ids is None else tuple(tuple(row) for row in top_ids),
                    topk_logprobs_TK=None if top_lps is None else tuple(tuple(row) for row in top_lps),
                ))
            grouped.append(group)
            cursor += len(completions)
        return grouped

    async def aclose(self) -> None:
        return None


# --- training ------------------------------------------------------------------


def importance_sampling_loss(
    learner_logprobs_BT: torch.Tensor,
    sampling_logprobs_BT: torch.Tensor,
    advantages_BT: torch.Tensor,
    mask_BT: torch.Tensor,
) -> torch.Tensor:
    """Sum over tokens of ``-exp(learner - sampling) * advantage``.

    At the rollout policy (learner == sampling) with OPD advantages its value
    is the summed sampled reverse KL, and its gradient is the per-token
    reverse-KL policy gradient.
    """
    ratio_BT = torch.exp(learner_logprobs_BT - sampling_logprobs_BT)
    return -(ratio_BT * advantages_BT * mask_BT).sum()


def topk_cross_entropy_loss(
    logp_BLV: torch.Tensor, target_ids_BLK: torch.Tensor, target_probs_BLK: torch.Tensor, mask_BL: torch.Tensor
) -> torch.Tensor:
    """Sum over tokens of the cross-entropy ``-sum_k p_k log q(id_k)`` on soft top-K targets.

    Up to the targets' entropy, which has no gradient, this is the forward KL
    from the (truncated, renormalised) teacher distribution to the student.
    Padding candidates carry probability 0.
    """
    learner_BLK = logp_BLV.gather(2, target_ids_BLK)
    return -((target_probs_BLK * learner_BLK).sum(-1) * mask_BL).sum()


def pad_datums(datums: Sequence[Datum], *, pad_token_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-pad datums into batch tensors of shape (B, L), and (B, L, K) for top-K targets."""
    width = max(len(d.input_ids_T) for d in datums)
    batch = len(datums)

    def tensor(dtype: torch.dtype, fill: float) -> torch.Tensor:
        return torch.full((batch, width), fill, dtype=dtype, device=device)

    out = {
        "input_ids": tensor(torch.long, pad_token_id),
        "target_ids": tensor(torch.long, pad_token_id),
        "attention_mask": tensor(torch.long, 0),
        "sampling_logprobs": tensor(torch.float32, 0.0),
        "advantages": tensor(torch.float32, 0.0),
        "mask": tensor(torch.float32, 0.0),
    }
    for i, d in enumerate(datums):
        n = len(d.input_ids_T)
        out["input_ids"][i, :n] = torch.tensor(d.input_ids_T)
        out["target_ids"][i, :n] = torch.tensor(d.target_ids_T)
        out["attention_mask"][i, :n] = 1
        out["sampling_logprobs"][i, :n] = torch.tensor(d.sampling_logprobs_T)
        out["advantages"][i, :n] = torch.tensor(d.advantages_T)
        out["mask"][i, :n] = torch.tensor(d.mask_T)

    if any(d.target_ids_TK is not None for d in datums):
        k = max((len(row) for d in datums for row in d.target_ids_TK or ()), default=1) or 1
        out["target_ids_K"] = torch.zeros((batch, width, k), dtype=torch.long, device=device)
        out["target_probs_K"] = torch.zeros((batch, width, k), dtype=torch.float32, device=device)
        for i, d in enumerate(datums):
            for position, (ids, probs) in enumerate(zip(d.target_ids_TK or (), d.target_probs_TK or (), strict=True)):
                if ids:
                    out["target_ids_K"][i, position, :len(ids)] = torch.tensor(ids)
                    out["target_probs_K"][i, position, :len(probs)] = torch.tensor(probs)
    return out


def target_logprobs(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logprob of each target id under ``model``, shape (B, L)."""
    logits_BLV = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp_BLV = torch.log_softmax(logits_BLV, dim=-1)
    return logp_BLV.gather(2, batch["target_ids"][:, :, None]).squeeze(2)


LOCAL_LOSSES = ("importance_sampling", "topk_forward_kl")


class WeightPublisher(Protocol):
    """Delivers the trainer's weights to a sampler outside this process (an inference server)."""

    async def publish(self, *, version: int, save: Callable[[Path], Awaitable[None]]) -> None:
        """Write the weights with ``save(directory)`` and make the sampler use them as ``version``."""
        ...


class LocalTrainer:
    """AdamW on a private copy of the student; publishes weights to the sampler.

    The optimized loss is :func:`importance_sampling_loss` divided by the
    number of trained tokens in the step, so the learning rate does not depend
    on the batch size.

    :param sampler: in-process sampler that receives the weights after each
        step; None when the student is served elsewhere.
    :param publisher: hook that delivers the weights to a served student after
        each step; ``train_step`` returns only once it has finished.
    :param lora: train LoRA matrices only (see :mod:`mopd.backends.local.lora`);
        None trains every weight.
    """

    def __init__(
        self,
        *,
        model: PreTrainedModel,
        sampler: LocalSampler | None,
        executor: DeviceExecutor,
        pad_token_id: int,
        learning_rate: float,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        publisher: WeightPublisher | None = None,
        lora: LoraSpec | None = None,
        seed: int = 0,
    ) -> None:
        self._lora = lora
        self._peft = None
        if lora is not None:
            self._peft = wrap_lora(model, lora, seed=seed)
            model = self._peft.get_base_model()
        self._model = model
        self._sampler = sampler
        self._publisher = publisher
        self._executor = executor
        self._pad_token_id = pad_token_id
        self._max_grad_norm = max_grad_norm
        self._device = next(model.parameters()).device
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._optimizer = torch.optim.AdamW(self._trainable, lr=learning_rate, weight_decay=weight_decay)
        self._version = sampler.policy_version if sampler is not None else 0
        self._step = 0

    @property
    def policy_version(self) -> int:
        return self._version

    async def train_step(self, datums: Sequence[Datum], loss_fn: str) -> StepResult:
        if loss_fn not in LOCAL_LOSSES:
            raise ValueError(f"the local trainer has no loss {loss_fn!r}; use one of {', '.join(LOCAL_LOSSES)}")
        if not datums:
            raise ValueError("train_step needs at least one datum")
        if loss_fn == "topk_forward_kl" and any(d.target_ids_TK is None for d in datums):
            raise ValueError("topk_forward_kl needs top-K targets on every datum; score with top-K teachers")
        result = await self._executor.call(lambda: self._train_step(list(datums), loss_fn))
        if self._publisher is not None:
            await self._publisher.publish(version=result.policy_version, save=self.save_weights)
        return result

    async def save_weights(self, directory: Path) -> None:
        """Write the current weights as a save_pretrained directory (safetensors), on the device thread.

        With LoRA the directory contains the merged weights or the peft adapter, as ``LoraSpec.publish`` selects.
        """
        if self._peft is not None and self._lora is not None:
            peft, publish = self._peft, self._lora.publish
            await self._executor.call(lambda: save_lora_weights(peft, directory, publish=publish))
            return
        await self._executor.call(lambda: self._model.save_pretrained(str(directory), safe_serialization=True))

    def _sampler_weights(self) -> tuple[dict[str, torch.Tensor], bool]:
        """Weights for the in-process sampler, and whether they are the full set (strict loading)."""
        if self._lora is None:
            return self._model.state_dict(), True
        if self._lora.publish == "adapter":
            return adapter_state_dict(self._model), False
        return merged_state_dict(self._model), True

    def _train_step(self, datums: list[Datum], loss_fn: str = "importance_sampling") -> StepResult:
        started = time.monotonic()
        self._model.train()

        # 1. Forward and backward.
        batch = pad_datums(datums, pad_token_id=self._pad_token_id, device=self._device)
        if loss_fn == "topk_forward_kl":
            logits_BLV = self._model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logp_BLV = torch.log_softmax(logits_BLV.float(), dim=-1)
            loss_sum = topk_cross_entropy_loss(logp_BLV, batch["target_ids_K"], batch["target_probs_K"], batch["mask"])
        else:
            learner_BT = target_logprobs(self._model, batch)
            loss_sum = importance_sampling_loss(learner_BT, batch["sampling_logprobs"], batch["advantages"],
                                                batch["mask"])
        tokens = int(batch["mask"].sum().item())
        loss = loss_sum / max(tokens, 1)
        loss.backward()

        # 2. Clip and step.
        if self._max_grad_norm > 0:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self._trainable, self._max_grad_norm))
        else:
            grad_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in self._trainable if p.grad is not None))
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        self._step += 1

        # 3. Publish: the sampler runs on this same thread, so the next batch
        #    it samples already uses the new weights and version.
        self._version += 1
        if self._sampler is not None:
            weights, strict = self._sampler_weights()
            self._sampler.load_weights(weights, version=self._version, strict=strict)

        return StepResult(
            step=self._step, policy_version=self._version, loss=float(loss.item()), grad_norm=grad_norm,
            datums=len(datums), tokens=tokens, seconds=time.monotonic() - started,
        )

    async def save_state(self, path: Path) -> None:
        def save() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(path.suffix + ".tmp")
            torch.save(
                {"model": self._model.state_dict(), "optimizer": self._optimizer.state_dict(),
                 "version": self._version, "step": self._step},
                tmp,
            )
            tmp.replace(path)

        await self._executor.call(save)

    async def load_state(self, path: Path) -> None:
        def load() -> None:
            state = torch.load(path, map_location=self._device, weights_only=True)
            self._model.load_state_dict(state["model"])
            self._optimizer.load_state_dict(state["optimizer"])
            self._version = int(state["version"])
            self._step = int(state["step"])
            if self._sampler is not None:
                weights, strict = self._sampler_weights()
                self._sampler.load_weights(weights, version=self._version, strict=strict)

        await self._executor.call(load)
        if self._publisher is not None:
            await self._publisher.publish(version=self._version, save=self.save_weights)

    async def aclose(self) -> None:
        return None
