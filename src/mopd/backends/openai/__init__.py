"""The ``openai`` backend: student and teachers on OpenAI-compatible servers over httpx.

The student samples on its servers, each route's teacher scores on its own,
and the trainer is the local one, which publishes each new version of the
weights to the student servers (see :mod:`mopd.backends.openai.weights`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import structlog
import torch
from pydantic import SecretStr

from mopd.backends.local import check_same_tokenizer, lora_spec
from mopd.backends.local.executor import DeviceExecutor
from mopd.backends.local.models import LocalTrainer, load_causal_lm, resolve_device
from mopd.backends.openai.client import Deployment, RetryPolicy, Timeouts
from mopd.backends.openai.dialects import DEFAULT_SCORE_MODE, TOPK_SCORE_MODES, Wire
from mopd.backends.openai.sampler import OpenAISampler, OpenAIScorer
from mopd.backends.openai.weights import ServerWeightSync
from mopd.errors import ConfigError
from mopd.settings import Settings, TeacherConfig, resolve_teachers
from mopd.tokenization import PromptRenderer, load_tokenizer

log = structlog.get_logger(__name__)

# evaluate_accuracy sends up to this many requests at once; pools leave room for them.
EVALUATION_CONCURRENCY = 64


@dataclass
class OpenAIBackends:
    """Everything the pipeline needs from the openai backend."""

    renderer: PromptRenderer
    sampler: OpenAISampler
    scorers: dict[str, OpenAIScorer]
    trainer: LocalTrainer
    context_window: int | None
    teacher_samplers: dict[str, OpenAISampler]
    """Greedy samplers on the teacher servers, for evaluation only."""
    executor: DeviceExecutor
    deployments: list[Deployment] = field(default_factory=list)

    async def aclose(self) -> None:
        for deployment in self.deployments:
            await deployment.aclose()
        await self.executor.aclose()


def check_openai_settings(settings: Settings) -> None:
    """Reject settings the openai backend cannot run with.

    :raises ConfigError: naming the variable and the fix.
    """
    if not settings.student_base_urls:
        raise ConfigError("MOPD_BACKEND=openai needs MOPD_STUDENT_BASE_URLS, e.g. http://127.0.0.1:8000")
    for url in settings.student_base_urls:
        _check_url(url, variable="MOPD_STUDENT_BASE_URLS")
    # Sampling logprobs must describe the distribution that was sampled from:
    # with temperature != 1 only processed logprobs do.
    if settings.temperature != 1.0 and not settings.openai_processed_logprobs:
        raise ConfigError(
            f"MOPD_TEMPERATURE={settings.temperature} needs sampling logprobs after temperature, but the student "
            "server is not declared to report them; start vLLM with --logprobs-mode processed_logprobs and set "
            "MOPD_OPENAI_PROCESSED_LOGPROBS=true, or set MOPD_TEMPERATURE=1"
        )
    if settings.loss_fn == "topk_forward_kl":
        if settings.topk > settings.openai_max_logprobs:
            raise ConfigError(
                f"MOPD_TOPK={settings.topk} is above the teacher servers' limit of {settings.openai_max_logprobs} "
                "top-K candidates per position (MOPD_OPENAI_MAX_LOGPROBS; vLLM's --max-logprobs); lower MOPD_TOPK or "
                "raise the servers' limit and MOPD_OPENAI_MAX_LOGPROBS with it"
            )
        mode = DEFAULT_SCORE_MODE[settings.openai_dialect] if settings.openai_score_mode == "auto" \
            else settings.openai_score_mode
        if mode not in TOPK_SCORE_MODES:
            raise ConfigError(
                f"MOPD_LOSS_FN=topk_forward_kl needs top-K ids from the teachers, which score mode {mode!r} "
                f"({settings.openai_dialect}) does not return; set MOPD_OPENAI_SCORE_MODE to one of {TOPK_SCORE_MODES}"
            )
    sync_mode = settings.effective_weight_sync
    if settings.lora_rank and settings.lora_publish == "adapter" and sync_mode == "disk":
        raise ConfigError(
            "MOPD_LORA_PUBLISH=adapter writes a LoRA adapter, but MOPD_OPENAI_WEIGHT_SYNC=disk loads full weights; "
            "set MOPD_LORA_PUBLISH=merged or MOPD_OPENAI_WEIGHT_SYNC=lora"
        )
    if sync_mode == "lora" and not (settings.lora_rank and settings.lora_publish == "adapter"):
        log.warning("weight_sync_full_weights_as_adapter", dialect=settings.openai_dialect,
                    note="load_lora_adapter gets full weights, which mopd model-server loads and vLLM refuses; "
                         "set MOPD_LORA_RANK and MOPD_LORA_PUBLISH=adapter for vLLM")
    if sync_mode == "disk" and len(settings.student_base_urls) > 1:
        log.warning("weight_sync_disk_replicas", replicas=len(settings.student_base_urls),
                    note="replicas update one after another; a request between two updates sees older weights")


def build_openai_backends(settings: Settings) -> OpenAIBackends:
    """Connect to the servers and load the local trainer. Blocking: call from a worker thread."""
    check_openai_settings(settings)
    teachers, source, _ = resolve_teachers(settings)

    # 1. The student's tokenizer and the trainer's starting weights live in a local directory.
    student_dir = Path(settings.student_model_dir or settings.student_model or "")
    if not (student_dir / "config.json").is_file():
        raise ConfigError(
            f"MOPD_STUDENT_MODEL_DIR={str(student_dir)!r} is not a save_pretrained directory; the openai backend "
            "needs the student's weights and tokenizer locally for the trainer (set MOPD_STUDENT_MODEL_DIR)"
        )
    served_student = settings.student_model or str(student_dir)
    renderer = PromptRenderer(load_tokenizer(student_dir))

    # 2. One deployment (client, replicas, retries) per served model.
    timeouts = Timeouts(connect=settings.openai_connect_timeout_seconds, read=settings.openai_read_timeout_seconds,
                        pool=settings.openai_pool_timeout_seconds)
    retry = RetryPolicy(max_retries=settings.openai_max_retries, base_seconds=settings.openai_retry_base_seconds,
                        max_seconds=settings.openai_retry_max_seconds)
    score_mode = DEFAULT_SCORE_MODE[settings.openai_dialect] if settings.openai_score_mode == "auto" \
        else settings.openai_score_mode
    try:
        wire = Wire(dialect=settings.openai_dialect, score_mode=score_mode, token_ids_mode=settings.openai_token_ids)
    except ValueError as exc:
        raise ConfigError(f"MOPD_OPENAI_SCORE_MODE={settings.openai_score_mode!r}: {exc}") from exc

    student = Deployment(
        name="student", base_urls=settings.student_base_urls, api_key=settings.student_api_key, timeouts=timeouts,
        retry=retry, max_connections=settings.student_concurrency + EVALUATION_CONCURRENCY, seed=settings.seed,
    )
    deployments = [student]
    sampler = OpenAISampler(deployment=student, wire=wire, model=served_student)

    scorers: dict[str, OpenAIScorer] = {}
    teacher_samplers: dict[str, OpenAISampler] = {}
    for teacher in teachers:
        urls = teacher.base_urls or settings.teacher_base_urls.get(teacher.route)
        if not urls:
            raise ConfigError(
                f"teacher for route {teacher.route!r} has no base URL; add \"base_urls\" to its entry in "
                "MOPD_TEACHERS or an entry for the route in MOPD_TEACHER_BASE_URLS"
            )
        for url in urls:
            _check_url(url, variable=f"base_urls of route {teacher.route!r}")
        if teacher.tokenizer:
            check_same_tokenizer(student_dir, Path(teacher.tokenizer), route=teacher.route)
        connections = settings.teacher_workers_for(teacher) * settings.completions_per_prompt
        deployment = Deployment(
            name=teacher.route, base_urls=urls, api_key=_teacher_key(teacher, settings), timeouts=timeouts,
            retry=retry, max_connections=connections + EVALUATION_CONCURRENCY, seed=settings.seed,
        )
        deployments.append(deployment)
        scorers[teacher.route] = OpenAIScorer(name=teacher.route, deployment=deployment, wire=wire,
                                              model=teacher.model)
        teacher_samplers[teacher.route] = OpenAISampler(deployment=deployment, wire=wire, model=teacher.model,
                                                        name=teacher.route)

    # 3. The local trainer publishes every step to the student servers.
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    torch.manual_seed(settings.seed)
    device = resolve_device(settings.device)
    executor = DeviceExecutor(max_batch_size=settings.max_batch_size)
    sync = ServerWeightSync(
        deployment=student, sampler=sampler, mode=settings.effective_weight_sync,
        local_dir=settings.openai_weight_dir or settings.state_dir / "weights",
        server_dir=settings.openai_weight_server_dir, keep_versions=settings.openai_keep_weight_versions,
    )
    model = load_causal_lm(student_dir, device=device, train=True)
    trainer = LocalTrainer(
        model=model, sampler=None, executor=executor, pad_token_id=renderer.pad_token_id,
        learning_rate=settings.learning_rate, weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm, publisher=sync, lora=lora_spec(settings), seed=settings.seed,
    )

    log.info("openai_backend_ready", dialect=wire.dialect, score_mode=wire.score_mode, student=served_student,
             student_replicas=len(student.replicas), teachers=sorted(scorers), teacher_source=source,
             weight_sync=settings.effective_weight_sync, trainer_device=str(device))
    return OpenAIBackends(
        renderer=renderer, sampler=sampler, scorers=scorers, trainer=trainer,
        context_window=getattr(model.config, "max_position_embeddings", None),
        teacher_samplers=teacher_samplers, executor=executor, deployments=deployments,
    )


def _teacher_key(teacher: TeacherConfig, settings: Settings) -> SecretStr | None:
    if teacher.api_key_env:
        value = os.environ.get(teacher.api_key_env)
        if value is None:
            raise ConfigError(
                f"teacher for route {teacher.route!r} names api_key_env={teacher.api_key_env!r}, which is not set; "
                "export that variable or remove api_key_env"
            )
        return SecretStr(value)
    return settings.teacher_api_key


def _check_url(url: str, *, variable: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{variable}: {url!r} is not an http(s) base URL; write it like http://127.0.0.1:8000")
