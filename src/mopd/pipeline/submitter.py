"""Stage 5: gather groups into steps, train, publish weights, record the step."""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import orjson
import structlog
from anyio.abc import ObjectReceiveStream

from mopd.backends.base import Trainer
from mopd.metrics import Metrics
from mopd.pipeline.checkpoint import StateStore
from mopd.pipeline.gate import StepGate
from mopd.pipeline.progress import ProgressTracker
from mopd.pipeline.reader import RejectsFile
from mopd.types import RouteStats, StepResult, TrainGroup

log = structlog.get_logger(__name__)


@dataclass
class StepRecord:
    """One optimizer step as written to the step metrics JSONL."""

    result: StepResult
    routes: dict[str, RouteStats]
    row_ids: list[str]
    """Ids of the rows trained in this step (``<source>:<line>``)."""
    finished_at: float
    row_epochs: list[int] = field(default_factory=list)
    """Epoch of each row in ``row_ids``, in the same order."""
    evaluation: dict[str, float] = field(default_factory=dict)
    """Figures of an evaluation run after this step (``eval/<route>/<name>``); empty when none ran."""

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "step": self.result.step,
            "policy_version": self.result.policy_version,
            "loss": self.result.loss,
            "grad_norm": self.result.grad_norm,
            "datums": self.result.datums,
            "tokens": self.result.tokens,
            "rows": len(self.row_ids),
            "row_ids": self.row_ids,
            "row_epochs": self.row_epochs,
            "step_seconds": self.result.seconds,
            "finished_at": self.finished_at,
        }
        for route, stats in sorted(self.routes.items()):
            tokens = max(stats.tokens, 1)
            out[f"route/{route}/reverse_kl"] = stats.reverse_kl_sum / tokens
            out[f"route/{route}/teacher_nll"] = stats.teacher_nll_sum / tokens
            out[f"route/{route}/student_nll"] = stats.student_nll_sum / tokens
            out[f"route/{route}/tokens"] = stats.tokens
            out[f"route/{route}/samples"] = stats.samples
            if stats.topk_tokens:
                out[f"route/{route}/topk_mass"] = stats.topk_mass_sum / stats.topk_tokens
                out[f"route/{route}/topk_entropy"] = stats.topk_entropy_sum / stats.topk_tokens
        out.update(self.evaluation)
        return out


@dataclass
class RouteHistory:
    """Per-step token and reverse-KL sums of one route, in compact arrays.

    Step records themselves go to the step metrics JSONL, not to memory, so a
    run of millions of rows keeps about 24 bytes per step and route here.
    """

    steps: array = field(default_factory=lambda: array("q"))
    tokens: array = field(default_factory=lambda: array("q"))
    reverse_kl_sums: array = field(default_factory=lambda: array("d"))

    def append(self, step: int, stats: RouteStats) -> None:
        self.steps.append(step)
        self.tokens.append(stats.tokens)
        self.reverse_kl_sums.append(stats.reverse_kl_sum)

    def mean_reverse_kl(self, *, first: bool, fraction: float = 0.1) -> float | None:
        """Mean per-token reverse KL over the first or last ``fraction`` of the steps with tokens."""
        indices = [i for i, tokens in enumerate(self.tokens) if tokens]
        if not indices:
            return None
        count = max(1, math.ceil(len(indices) * fraction))
        window = indices[:count] if first else indices[-count:]
        return sum(self.reverse_kl_sums[i] for i in window) / sum(self.tokens[i] for i in window)


@dataclass
class SubmitterState:
    """Progress of the trainer submitter: steps, versions and per-route history."""

    steps: int = 0
    """Optimizer steps taken."""
    policy_version: int = 0
    """Version published by the last step."""
    routes: dict[str, RouteHistory] = field(default_factory=dict)
    rows_trained: int = 0
    stale_groups: int = 0
    abandoned_groups: int = 0
    """Groups that arrived after max_steps was reached; they are not trained."""
    in_step: bool = False
    """True from the start of a train step until its rows are recorded (and committed when due)."""


@dataclass(frozen=True)
class StepEvaluator:
    """Evaluation run inside the submitter every ``every_steps`` optimizer steps.

    It runs before the gate admits the next step's rows, so it measures the
    weights of exactly that step and does not compete with sampling.
    """

    every_steps: int
    evaluate: Callable[[int], Awaitable[dict[str, float]]]
    """Called with the step number; returns flat figures such as ``eval/<route>/accuracy``."""

    def due(self, steps: int) -> bool:
        return self.every_steps > 0 and steps % self.every_steps == 0


@dataclass
class Checkpointer:
    """Commits the trainer checkpoint with the resume cursor (see ``checkpoint.py``)."""

    store: StateStore
    trainer: Trainer
    progress: ProgressTracker
    metrics: Metrics
    rejects: RejectsFile
    dead_letters: RejectsFile | None = None
    every_steps: int = 1
    """Steps between two commits; the cursor is committed only with a checkpoint."""

    def due(self, steps: int) -> bool:
        return self.every_steps > 0 and steps % self.every_steps == 0

    async def commit(self, state: SubmitterState) -> None:
        started = time.monotonic()
        await self.store.commit(
            trainer=self.trainer, step=state.steps, policy_version=state.policy_version, tracker=self.progress,
            counters={
                "rows_trained": state.rows_trained,
                "rows_rejected": self.rejects.count,
                "rows_dead_lettered": self.dead_letters.count if self.dead_letters is not None else 0,
            },
        )
        self.metrics.checkpoints.inc()
        self.metrics.checkpoint_seconds.observe(time.monotonic() - started)


async def submit_steps(
    receive_train: ObjectReceiveStream[TrainGroup],
    *,
    trainer: Trainer,
    gate: StepGate,
    metrics: Metrics,
    rejects: RejectsFile,
    state: SubmitterState,
    groups_per_step: int,
    max_steps: int,
    max_policy_lag: int,
    loss_fn: str,
    steps_path: Path | None,
    on_max_steps: Callable[[], None],
    checkpointer: Checkpointer | None = None,
    evaluator: StepEvaluator | None = None,
) -> None:
    """Stage 5: train every ``groups_per_step`` groups; train the partial last batch at the end.

    :param checkpointer: commits the trainer checkpoint with the resume cursor
        after every ``checkpointer.every_steps`` steps; None never commits.
    :param evaluator: evaluates the student after every ``evaluator.every_steps``
        steps and adds its figures to the step record; None never evaluates.
    """
    batch: list[TrainGroup] = []
    steps_file = None
    if steps_path is not None:
        steps_path.parent.mkdir(parents=True, exist_ok=True)
        steps_file = steps_path.open("ab")
    try:
        async with receive_train:
            async for train_group in receive_train:
                if max_steps and state.steps >= max_steps:
                    state.abandoned_groups += 1
                    continue

                # Drop samples older than the lag allows; the row goes to rejects, never silently away.
                lag = trainer.policy_version - train_group.policy_version
                if lag > max_policy_lag:
                    state.stale_groups += 1
                    row = train_group.row
                    rejects.write_row(
                        row, reason="stale_policy",
                        message=f"samples are {lag} policy versions old; MOPD_MAX_POLICY_LAG={max_policy_lag}",
                    )
                    gate.group_failed()
                    continue

                batch.append(train_group)
                if len(batch) >= groups_per_step:
                    await _train(batch, trainer=trainer, gate=gate, metrics=metrics, state=state,
                                 loss_fn=loss_fn, steps_file=steps_file, checkpointer=checkpointer,
                                 evaluator=evaluator)
                    batch = []
                    if max_steps and state.steps >= max_steps:
                        log.info("max_steps_reached", steps=state.steps)
                        on_max_steps()

            if batch and not (max_steps and state.steps >= max_steps):
                await _train(batch, trainer=trainer, gate=gate, metrics=metrics, state=state,
                             loss_fn=loss_fn, steps_file=steps_file, checkpointer=checkpointer,
                                 evaluator=evaluator)
    finally:
        if steps_file is not None:
            steps_file.close()


async def _train(
    batch: list[TrainGroup],
    *,
    trainer: Trainer,
    gate: StepGate,
    metrics: Metrics,
    state: SubmitterState,
    loss_fn: str,
    steps_file,
    checkpointer: Checkpointer | None = None,
    evaluator: StepEvaluator | None = None,
) -> None:
    datums = [d for group in batch for d in group.datums]
    routes: dict[str, RouteStats] = {}
    for group in batch:
        routes[group.row.route] = routes.get(group.row.route, RouteStats()).merge(group.stats)

    state.in_step = True
    result = await trainer.train_step(datums, loss_fn)
    record = StepRecord(result=result, routes=routes, row_ids=[g.row.row_id for g in batch], finished_at=time.time(),
                        row_epochs=[g.row.epoch for g in batch])
    state.steps += 1
    state.policy_version = result.policy_version
    state.rows_trained += len(batch)
    for route, stats in routes.items():
        state.routes.setdefault(route, RouteHistory()).append(result.step, stats)

    # Export the step before opening the gate, so dashboards never show a
    # version whose step is missing.
    metrics.train_steps.inc()
    metrics.policy_version.set(result.policy_version)
    metrics.step_seconds.observe(result.seconds)
    metrics.train_loss.set(result.loss)
    for route, stats in routes.items():
        tokens = max(stats.tokens, 1)
        metrics.reverse_kl.labels(route=route).set(stats.reverse_kl_sum / tokens)
        metrics.teacher_nll.labels(route=route).set(stats.teacher_nll_sum / tokens)
        metrics.student_nll.labels(route=route).set(stats.student_nll_sum / tokens)
        metrics.route_trained_tokens.labels(route=route).inc(stats.tokens)
        if stats.topk_tokens:
            metrics.topk_mass.labels(route=route).set(stats.topk_mass_sum / stats.topk_tokens)
            metrics.topk_entropy.labels(route=route).set(stats.topk_entropy_sum / stats.topk_tokens)
    for group in batch:
        metrics.rows_trained.labels(route=group.row.route).inc()
    if evaluator is not None and evaluator.due(state.steps):
        record.evaluation = await evaluator.evaluate(state.steps)
    if steps_file is not None:
        steps_file.write(orjson.dumps(record.to_json()) + b"\n")
        steps_file.flush()
    if checkpointer is not None:
        for group in batch:
            checkpointer.progress.finish(epoch=group.row.epoch, source=group.row.source,
                                         line_number=group.row.line_number, end_offset=group.row.end_offset)

    log.info("train_step", **{k: v for k, v in record.to_json().items()
                              if "/" not in k and k not in ("row_ids", "row_epochs")},
             reverse_kl={r: round(s.reverse_kl_sum / max(s.tokens, 1), 4) for r, s in routes.items()})
    # Commit before the gate admits the next step's rows, so the checkpoint
    # does not queue behind their sampling on a shared device thread.
    if checkpointer is not None and checkpointer.due(state.steps):
        await checkpointer.commit(state)
    state.in_step = False
    gate.step_done()
    await anyio.lowlevel.checkpoint()
