"""Build the backends a run uses from its settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mopd.backends.base import StudentSampler, TeacherScorer, Trainer
from mopd.errors import ConfigError
from mopd.settings import Settings
from mopd.tokenization import PromptRenderer


class _Closable(Protocol):
    async def aclose(self) -> None: ...


@dataclass
class Backends:
    """The student sampler, one scorer per route, the trainer, and the shared tokenizer."""

    renderer: PromptRenderer
    sampler: StudentSampler
    scorers: dict[str, TeacherScorer]
    trainer: Trainer
    context_window: int | None
    """Maximum sequence length (prompt + completion) the student accepts; None when unknown."""
    teacher_samplers: dict[str, StudentSampler]
    """Greedy samplers over the teachers, used to report teacher accuracy; may be empty."""
    owner: _Closable | None = None
    """Object whose ``aclose`` releases the backends' resources."""
    student_scorer: TeacherScorer | None = None
    """Scores completions under the current student weights (for the teacher-trace gap); None when the
    backend cannot."""

    async def aclose(self) -> None:
        if self.owner is not None:
            await self.owner.aclose()


def build_backends(settings: Settings) -> Backends:
    """Build the backends named by ``MOPD_BACKEND``. Blocking: call from a worker thread."""
    if settings.backend == "local":
        from mopd.backends.local import build_local_backends

        local = build_local_backends(settings)
        return Backends(
            renderer=local.renderer, sampler=local.sampler, scorers=dict(local.scorers), trainer=local.trainer,
            context_window=local.context_window, teacher_samplers=dict(local.teacher_samplers), owner=local,
            student_scorer=local.student_scorer,
        )
    if settings.backend == "openai":
        from mopd.backends.openai import build_openai_backends

        served = build_openai_backends(settings)
        return Backends(
            renderer=served.renderer, sampler=served.sampler, scorers=dict(served.scorers), trainer=served.trainer,
            context_window=served.context_window, teacher_samplers=dict(served.teacher_samplers), owner=served,
        )
    if settings.backend == "tinker":
        from mopd.backends.tinker import build_tinker_backends

        remote = build_tinker_backends(settings)
        return Backends(
            renderer=remote.renderer, sampler=remote.sampler, scorers=dict(remote.scorers), trainer=remote.trainer,
            context_window=remote.context_window, teacher_samplers=dict(remote.teacher_samplers), owner=remote,
        )
    raise ConfigError(f"MOPD_BACKEND={settings.backend!r} is not supported; use local, openai or tinker")
