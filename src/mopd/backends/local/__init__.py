"""The ``local`` backend: transformers + torch in-process, CPU or CUDA."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import structlog
import torch

from mopd.backends.local.executor import DeviceExecutor
from mopd.backends.local.lora import LoraSpec, parse_target_modules, wrap_lora
from mopd.backends.local.models import LocalSampler, LocalScorer, LocalTrainer, load_causal_lm, resolve_device
from mopd.errors import ConfigError
from mopd.settings import Settings, resolve_teachers
from mopd.tokenization import PromptRenderer, check_teacher_tokenizer, load_tokenizer

log = structlog.get_logger(__name__)


@dataclass
class LocalBackends:
    """Everything the pipeline needs from the local backend."""

    executor: DeviceExecutor
    renderer: PromptRenderer
    sampler: LocalSampler
    scorers: dict[str, LocalScorer]
    trainer: LocalTrainer
    context_window: int | None
    teacher_samplers: dict[str, LocalSampler]
    """Greedy samplers over the teacher models, for evaluation only."""
    student_scorer: LocalScorer | None = None
    """Scorer over the sampler's student model (the latest published weights), for evaluation only."""

    async def aclose(self) -> None:
        await self.executor.aclose()


def lora_spec(settings: Settings) -> LoraSpec | None:
    """Return the LoRA settings of the local trainer, or None when MOPD_LORA_RANK is 0."""
    if not settings.lora_rank:
        return None
    return LoraSpec(
        rank=settings.lora_rank, alpha=settings.lora_alpha or 2.0 * settings.lora_rank,
        target_modules=parse_target_modules(settings.lora_target_modules), publish=settings.lora_publish,
    )


def resolve_model_path(name: str, *, model_root: str | None, variable: str) -> Path:
    """Find a model directory: the name itself, or ``<model_root>/<name>``."""
    candidates = [Path(name)]
    if model_root:
        candidates.append(Path(model_root) / name)
    for path in candidates:
        if (path / "config.json").is_file():
            return path
    tried = ", ".join(repr(str(p)) for p in candidates)
    raise ConfigError(
        f"{variable}: model {name!r} is not a local model directory (tried {tried}); the local backend loads "
        "save_pretrained directories, so set it to such a directory or set MOPD_MODEL_ROOT to their parent"
    )


def build_local_backends(settings: Settings) -> LocalBackends:
    """Load the student (sampler and trainer copies) and every teacher onto one device."""
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    torch.manual_seed(settings.seed)
    device = resolve_device(settings.device)

    student_path = resolve_model_path(settings.student_model or "", model_root=settings.model_root,
                                      variable="MOPD_STUDENT_MODEL")
    tokenizer = load_tokenizer(student_path)
    renderer = PromptRenderer(tokenizer)
    executor = DeviceExecutor(max_batch_size=settings.max_batch_size)

    student = load_causal_lm(student_path, device=device)
    lora = lora_spec(settings)
    if lora is not None and lora.publish == "adapter":
        # The sampler receives only the LoRA matrices, so it carries the same LoRA layers.
        student = wrap_lora(student, lora, seed=settings.seed).get_base_model()
    sampler = LocalSampler(model=student, executor=executor, eos_token_ids=[renderer.eos_token_id],
                           pad_token_id=renderer.pad_token_id, seed=settings.seed)
    trainer = LocalTrainer(
        model=load_causal_lm(student_path, device=device, train=True), sampler=sampler, executor=executor,
        pad_token_id=renderer.pad_token_id, learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay, max_grad_norm=settings.max_grad_norm, lora=lora, seed=settings.seed,
    )

    teachers, source, _ = resolve_teachers(settings)
    scorers: dict[str, LocalScorer] = {}
    teacher_samplers: dict[str, LocalSampler] = {}
    for teacher in teachers:
        path = resolve_model_path(teacher.model, model_root=settings.model_root, variable=source or "teachers")
        check_same_tokenizer(student_path, Path(teacher.tokenizer) if teacher.tokenizer else path, route=teacher.route)
        model = load_causal_lm(path, device=device)
        scorers[teacher.route] = LocalScorer(name=teacher.route, model=model, executor=executor,
                                             pad_token_id=renderer.pad_token_id)
        teacher_samplers[teacher.route] = LocalSampler(
            model=model, executor=executor, eos_token_ids=[renderer.eos_token_id],
            pad_token_id=renderer.pad_token_id, seed=settings.seed, name=teacher.route,
        )

    context = getattr(student.config, "max_position_embeddings", None)
    log.info("local_backend_loaded", device=str(device), student=str(student_path), teachers=sorted(scorers),
             parameters=sum(p.numel() for p in student.parameters()))
    student_scorer = LocalScorer(name="student", model=student, executor=executor, pad_token_id=renderer.pad_token_id)
    return LocalBackends(executor=executor, renderer=renderer, sampler=sampler, scorers=scorers, trainer=trainer,
                         context_window=context, teacher_samplers=teacher_samplers, student_scorer=student_scorer)


def check_same_tokenizer(student_dir: Path, teacher_dir: Path, *, route: str) -> None:
    """Refuse a teacher whose tokenizer differs from the student's: its ids would mean other text.

    A teacher directory without tokenizer files is not checked.
    """
    if not (teacher_dir / "tokenizer_config.json").is_file() and not (teacher_dir / "tokenizer.json").is_file():
        return
    check_teacher_tokenizer(student_dir, teacher_dir, route=route)
