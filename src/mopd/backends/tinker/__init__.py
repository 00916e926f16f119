"""The ``tinker`` backend: student, teachers and trainer on the Tinker training API.

The student is a LoRA TrainingClient. Every step runs ``forward_backward``
with the ``importance_sampling`` loss and ``optim_step``, then
``save_weights_for_sampler`` and a fresh SamplingClient over the saved
weights, so the next samples come from the new policy version. Teachers are
SamplingClients over their base models (or ``tinker://`` paths) and score with
``compute_logprobs``, whose first value is None because the first prompt
token has no context.

The SDK runs its own event loop on a background thread; its futures are
awaited from the pipeline's loop. Tinker datums carry no mask, so prompt
positions train with advantage 0 (element ``i`` predicts token ``i + 1``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog

from mopd.backends.base import SamplingParams, ScoredCompletion
from mopd.errors import BackendError, ConfigError, TeacherError
from mopd.settings import Settings, resolve_teachers
from mopd.tokenization import PromptRenderer, check_teacher_tokenizer, load_tokenizer
from mopd.types import Datum, Sample, StepResult

log = structlog.get_logger(__name__)

TINKER_PATH_PREFIX = "tinker://"


def _import_tinker() -> Any:
    try:
        import tinker
    except ImportError as exc:
        raise ConfigError(
            "MOPD_BACKEND=tinker needs the tinker SDK; install it with pip install 'mopd[tinker]'"
        ) from exc
    return tinker


def _model_input(ids: Sequence[int]) -> Any:
    from tinker import types

    return types.ModelInput.from_ints([int(i) for i in ids])


class TinkerSampler:
    """Student (or teacher) sampler on a Tinker SamplingClient.

    :param eos_token_ids: ids that end a completion; sent as the stop list.
    """

    def __init__(self, *, client: Any, eos_token_ids: Sequence[int], name: str = "student", version: int = 0) -> None:
        self.name = name
        self._client = client
        self._eos_token_ids = tuple(eos_token_ids)
        self._version = version

    @property
    def policy_version(self) -> int:
        return self._version

    def swap(self, client: Any, *, version: int) -> None:
        """Sample from ``client`` (new weights) from now on, stamped with ``version``."""
        self._client = client
        self._version = version

    async def sample(self, prompt_ids_T: Sequence[int], params: SamplingParams) -> list[Sample]:
        from tinker import types

        if not prompt_ids_T:
            raise ValueError("cannot sample from an empty prompt")
        client, version = self._client, self._version
        stop = sorted(set(self._eos_token_ids) | set(params.stop_token_ids))
        # No seed: one fixed seed per request would repeat the same samples for a prompt in every epoch.
        sampling = types.SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, stop=stop)
        try:
            response = await client.sample(_model_input(prompt_ids_T), num_samples=params.n, sampling_params=sampling)
        except Exception as exc:  # noqa: BLE001 - the SDK raises many types; all mean the call failed
            raise BackendError("tinker_sample_failed", f"Tinker sample on {self.name!r} failed: {exc!r}") from exc

        samples = []
        for sequence in response.sequences:
            tokens = tuple(int(t) for t in sequence.tokens)
            logprobs = sequence.logprobs
            if logprobs is None or len(logprobs) != len(tokens):
                raise BackendError(
                    "tinker_missing_logprobs",
                    f"Tinker returned {len(tokens)} tokens but "
                    f"{'no' if logprobs is None else len(logprobs)} logprobs for {self.name!r}",
                )
            samples.append(Sample(
                completion_ids_T=tokens, sampling_logprobs_T=tuple(float(v) for v in logprobs),
                finish_reason="length" if sequence.stop_reason == "length" else "stop", policy_version=version,
            ))
        return samples

    async def aclose(self) -> None:
        return None


class TinkerScorer:
    """Teacher scorer on a Tinker SamplingClient (``compute_logprobs``)."""

    def __init__(self, *, name: str, client: Any) -> None:
        self.name = name
        self._client = client

    async def score(
        self, prompt_ids_T: Sequence[int], completions_S: Sequence[Sequence[int]], *, top_k: int = 0
    ) -> list[ScoredCompletion]:
        if not prompt_ids_T:
            raise ValueError("cannot score after an empty prompt")
        results: list[ScoredCompletion | None] = [None] * len(completions_S)

        async def one(index: int, completion: Sequence[int]) -> None:
            results[index] = await self._score_one(prompt_ids_T, completion, top_k=top_k)

        async with anyio.create_task_group() as tg:
            for index, completion in enumerate(completions_S):
                tg.start_soon(one, index, completion)
        return [result for result in results if result is not None]

    async def _score_one(self, prompt_ids_T: Sequence[int], completion_T: Sequence[int], *, top_k: int) -> ScoredCompletion:
        from tinker import types

        if not completion_T:
            return ScoredCompletion(logprobs_T=())
        ids = [*prompt_ids_T, *completion_T]
        count = len(completion_T)
        topk_rows = None
        try:
            # prompt_logprobs_last_n scores only the completion, so the server can reuse the prompt's cache.
            if top_k:
                response = await self._client.sample(
                    _model_input(ids), num_samples=1, sampling_params=types.SamplingParams(max_tokens=1),
                    include_prompt_logprobs=True, topk_prompt_logprobs=top_k, prompt_logprobs_last_n=count,
                )
                values = response.prompt_logprobs or []
                topk_rows = response.topk_prompt_logprobs
            else:
                values = await self._client.compute_logprobs(_model_input(ids), prompt_logprobs_last_n=count)
        except Exception as exc:  # noqa: BLE001 - the SDK raises many types; all mean the call failed
            raise TeacherError("tinker_score_failed", f"Tinker compute_logprobs on {self.name!r} failed: {exc!r}") from exc

        if len(values) != len(ids):
            return ScoredCompletion(logprobs_T=None, failure="length_mismatch")
        # A None (the first prompt token, or a position the server skipped) becomes NaN, which
        # the advantage builder rejects as nonfinite_logprob.
        logprobs = tuple(math.nan if v is None else float(v) for v in values[-count:])
        topk_ids = topk_logprobs = None
        if topk_rows is not None:
            tail = list(topk_rows)[-count:]
            if any(row is None for row in tail):
                return ScoredCompletion(logprobs_T=None, failure="missing_topk")
            topk_ids = tuple(tuple(int(i) for i, _ in row) for row in tail)
            topk_logprobs = tuple(tuple(float(v) for _, v in row) for row in tail)
        return ScoredCompletion(logprobs_T=logprobs, topk_ids_TK=topk_ids, topk_logprobs_TK=topk_logprobs)

    async def aclose(self) -> None:
        return None


def tinker_datum(datum: Datum) -> Any:
    """Convert a datum to Tinker's: ``target_tokens``, sampling ``logprobs`` and ``advantages``.

    Tinker has no mask input, so masked positions are sent with advantage 0.
    """
    from tinker import types

    count = len(datum.input_ids_T)
    advantages = [a * m for a, m in zip(datum.advantages_T, datum.mask_T, strict=True)]
    return types.Datum(
        model_input=_model_input(datum.input_ids_T),
        loss_fn_inputs={
            "target_tokens": types.TensorData(data=[int(t) for t in datum.target_ids_T], dtype="int64", shape=[count]),
            "logprobs": types.TensorData(data=list(datum.sampling_logprobs_T), dtype="float32", shape=[count]),
            "advantages": types.TensorData(data=advantages, dtype="float32", shape=[count]),
        },
    )


class TinkerTrainer:
    """LoRA training on the Tinker service; publishes each version to a :class:`TinkerSampler`.

    :param run_name: prefix of the names the sampler weights are saved under.
    :param service: the ServiceClient, used to resume from a saved state.
    """

    def __init__(
        self,
        *,
        training_client: Any,
        sampler: TinkerSampler,
        service: Any = None,
        learning_rate: float,
        weight_decay: float = 0.0,
        max_grad_norm: float = 0.0,
        run_name: str = "mopd",
    ) -> None:
        self._training = training_client
        self._service = service
        self._sampler = sampler
        self._learning_rate = learning_rate
        self._weight_decay = weight_decay
        self._max_grad_norm = max_grad_norm
        self._run_name = run_name
        self._version = sampler.policy_version
        self._step = 0
        self.sampler_paths: list[str] = []
        """``tinker://`` paths of the weights published to the sampler, oldest first."""

    @property
    def policy_version(self) -> int:
        return self._version

    async def train_step(self, datums: Sequence[Datum], loss_fn: str) -> StepResult:
        from tinker import types

        if loss_fn != "importance_sampling":
            raise ValueError(f"the tinker trainer has no loss {loss_fn!r}; use importance_sampling")
        if not datums:
            raise ValueError("train_step needs at least one datum")
        started = time.monotonic()
        tokens = int(sum(sum(d.mask_T) for d in datums))

        # 1. Submit forward_backward and optim_step together: the service runs them in order.
        adam = types.AdamParams(learning_rate=self._learning_rate, weight_decay=self._weight_decay,
                                grad_clip_norm=self._max_grad_norm)
        try:
            backward = self._training.forward_backward([tinker_datum(d) for d in datums], "importance_sampling")
            optim = self._training.optim_step(adam)
            output = await backward
            optim_result = await optim
        except Exception as exc:  # noqa: BLE001 - the SDK raises many types; all mean the step failed
            raise BackendError("tinker_train_failed", f"Tinker forward_backward/optim_step failed: {exc!r}") from exc

        # 2. Publish: save sampler weights and sample from a fresh client over them.
        version = self._version + 1
        await self._publish(version)
        self._version = version
        self._step += 1

        loss_sum = float(output.metrics.get("loss:sum", math.nan))
        optim_metrics = getattr(optim_result, "metrics", None) or {}
        return StepResult(
            step=self._step, policy_version=version, loss=loss_sum / max(tokens, 1),
            grad_norm=float(optim_metrics.get("grad_norm", math.nan)), datums=len(datums), tokens=tokens,
            seconds=time.monotonic() - started,
        )

    async def _publish(self, version: int) -> None:
        name = f"{self._run_name}-v{version:06d}"
        try:
            saved = await self._training.save_weights_for_sampler(name=name)
            client = await self._training.create_sampling_client(saved.path)
        except Exception as exc:  # noqa: BLE001
            raise BackendError("tinker_publish_failed", f"Tinker save_weights_for_sampler {name!r} failed: {exc!r}") from exc
        self.sampler_paths.append(saved.path)
        self._sampler.swap(client, version=version)
        log.info("tinker_weights_published", version=version, path=saved.path)

    async def save_state(self, path: Path) -> None:
        """Save weights and optimizer state on the service; write their ``tinker://`` path to ``path``."""
        try:
            saved = await self._training.save_state(f"{self._run_name}-state-{self._step:06d}")
        except Exception as exc:  # noqa: BLE001
            raise BackendError("tinker_save_failed", f"Tinker save_state failed: {exc!r}") from exc
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({"tinker_path": saved.path, "version": self._version, "step": self._step}))
        tmp.replace(path)

    async def load_state(self, path: Path) -> None:
        """Resume from the state that :meth:`save_state` recorded in ``path``: a new training client
        over the saved weights and optimizer state."""
        state = json.loads(path.read_text())
        if self._service is None:
            raise BackendError("tinker_load_failed", "the tinker trainer has no ServiceClient to resume with")
        tinker_path = state["tinker_path"]
        try:
            self._training = await self._service.create_training_client_from_state_with_optimizer(tinker_path)
        except Exception as exc:  # noqa: BLE001
            raise BackendError("tinker_load_failed", f"Tinker load of {tinker_path!r} failed: {exc!r}") from exc
        self._version = int(state["version"])
        self._step = int(state["step"])
        await self._publish(self._version)

    async def aclose(self) -> None:
        return None


@dataclass
class TinkerBackends:
    """Everything the pipeline needs from the tinker backend."""

    service: Any
    renderer: PromptRenderer
    sampler: TinkerSampler
    scorers: dict[str, TinkerScorer]
    trainer: TinkerTrainer
    context_window: int | None
    teacher_samplers: dict[str, TinkerSampler] = field(default_factory=dict)

    async def aclose(self) -> None:
        def close() -> None:
            self.service.close("success").result(timeout=30)

        try:
            await anyio.to_thread.run_sync(close)
        except Exception as exc:  # noqa: BLE001 - a failed goodbye must not hide the run's outcome
            log.warning("tinker_close_failed", error=repr(exc))


def check_tinker_settings(settings: Settings) -> None:
    """Reject settings the tinker backend cannot run with.

    :raises ConfigError: naming the variable and the fix.
    """
    if settings.tinker_api_key is None:
        raise ConfigError("MOPD_BACKEND=tinker needs TINKER_API_KEY; export the key of your Tinker account")
    if settings.student_model_dir is None:
        raise ConfigError(
            "MOPD_BACKEND=tinker needs MOPD_STUDENT_MODEL_DIR: a local directory with the student's tokenizer "
            "(tokenizer files and chat template), because prompts are rendered and encoded here"
        )
    if settings.loss_fn != "importance_sampling":
        raise ConfigError(
            f"MOPD_LOSS_FN={settings.loss_fn!r} is not available with MOPD_BACKEND=tinker; use importance_sampling"
        )
    # Sampling logprobs must describe the distribution that was sampled from. The service does not
    # document whether its logprobs are taken after temperature, so only temperature 1 is safe.
    if settings.temperature != 1.0:
        raise ConfigError(
            f"MOPD_TEMPERATURE={settings.temperature} is not supported with MOPD_BACKEND=tinker; set it to 1 so "
            "the sampling logprobs describe the distribution that was sampled from"
        )


def build_tinker_backends(settings: Settings) -> TinkerBackends:
    """Open a Tinker session, create the LoRA student and the teacher samplers. Blocking: call from a worker thread."""
    check_tinker_settings(settings)
    tinker = _import_tinker()
    teachers, source, _ = resolve_teachers(settings)

    # 1. Prompts are rendered and encoded locally with the student's tokenizer.
    student_dir = Path(settings.student_model_dir or "")
    renderer = PromptRenderer(load_tokenizer(student_dir))
    for teacher in teachers:
        if teacher.tokenizer:
            check_teacher_tokenizer(student_dir, Path(teacher.tokenizer), route=teacher.route)

    # 2. One session: the LoRA student and its first sampler.
    api_key = settings.tinker_api_key.get_secret_value() if settings.tinker_api_key else None
    service = tinker.ServiceClient(base_url=settings.tinker_base_url, api_key=api_key,
                                   user_metadata={"service": "mopd"})
    base_model = settings.student_model or ""
    training = service.create_lora_training_client(base_model=base_model, rank=settings.tinker_lora_rank,
                                                   seed=settings.seed).result()
    sampler = TinkerSampler(client=service.create_sampling_client(base_model=base_model).result(),
                            eos_token_ids=[renderer.eos_token_id])
    trainer = TinkerTrainer(training_client=training, sampler=sampler, service=service,
                            learning_rate=settings.learning_rate,
                            weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm,
                            run_name=f"mopd-{int(time.time())}")

    # 3. Teachers: a base model name or a tinker:// path of saved sampler weights.
    scorers: dict[str, TinkerScorer] = {}
    teacher_samplers: dict[str, TinkerSampler] = {}
    for teacher in teachers:
        if teacher.model.startswith(TINKER_PATH_PREFIX):
            client = service.create_sampling_client(model_path=teacher.model).result()
        else:
            client = service.create_sampling_client(base_model=teacher.model).result()
        scorers[teacher.route] = TinkerScorer(name=teacher.route, client=client)
        teacher_samplers[teacher.route] = TinkerSampler(client=client, eos_token_ids=[renderer.eos_token_id],
                                                        name=teacher.route)

    log.info("tinker_backend_ready", base_url=settings.tinker_base_url or "default", student=base_model,
             lora_rank=settings.tinker_lora_rank, teachers=sorted(scorers), teacher_source=source)
    return TinkerBackends(service=service, renderer=renderer, sampler=sampler, scorers=scorers, trainer=trainer,
                          context_window=None, teacher_samplers=teacher_samplers)
