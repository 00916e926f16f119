"""The orchestrator: five stages joined by bounded streams in one task group.

    reader -> rows -> sampler -> groups -> dispatcher -> route[r] -> pool[r] x N -> scored
           -> advantage builder -> train -> trainer submitter

Back-pressure and shutdown protocol:

1. Every stream is a bounded anyio memory object stream. A full stream makes
   its sender wait, so a slow trainer slows the sampler, which slows the
   reader. Memory stays flat however long the input is.
2. Each route has admission credits (see ``dispatcher.py``): the sampler
   takes one per row before sampling and the route's pool gives it back, so
   the dispatcher never waits on a full route queue. A teacher that stops
   answering is marked stalled and its rows are shed, so it holds only its
   own route's credits; a slow one makes the ordered input wait once its
   credits are used up.
3. The policy gate admits a row for sampling only when the trainer will
   accept its samples (see ``gate.py``), so strict on-policy runs never
   sample ahead of the weights.
4. A stage finishes by closing its send stream. The next stage sees the end
   of its input, finishes its in-flight work and closes its own, so the end
   of the input drains the pipeline front to back and the last partial step
   is trained.
5. A stop request (signal, or max_steps reached) sets ``stop`` and closes the
   gate: the reader stops reading and the sampler admits nothing more, then
   step 4 drains what is in flight. If draining takes longer than the grace
   period, the task group is cancelled and in-flight work is abandoned.
6. An exception in any stage cancels the task group, so no stage waits on a
   peer that died; the error propagates to the caller as ``StageError``
   naming the stage.
7. With a resilience policy, rows of an unavailable teacher are parked
   instead of rejected, and a parking stage sends them back into the
   sampler's input through a second sender on the rows stream. That sender
   closes only when no row can be parked any more, so the end of the input
   still drains the pipeline as in step 4.
8. With a checkpointer, the trainer submitter commits the trainer checkpoint
   with the resume cursor after every ``checkpoint_every_steps`` steps (see
   ``checkpoint.py``), and the run commits once more when it ends: after the
   end of the input, max_steps or a completed drain, and after an abandoned
   drain unless a step was cut short. A run that is cancelled from outside
   (a second signal) commits nothing more; it resumes from the last commit.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from dataclasses import dataclass
from pathlib import Path

import anyio
import structlog

from mopd.backends.base import SamplingParams, StudentSampler, TeacherScorer, Trainer
from mopd.concurrency import ConcurrencyController
from mopd.errors import StageError
from mopd.metrics import Metrics
from mopd.pipeline.advantages import build_advantages
from mopd.pipeline.dispatcher import RouteAdmission, dispatch_groups, score_route
from mopd.pipeline.follow import FollowConfig, follow_rows
from mopd.pipeline.gate import StepGate
from mopd.pipeline.progress import ProgressTracker
from mopd.pipeline.reader import RejectsFile, RouteTable, read_rows
from mopd.pipeline.resilience import ResiliencePolicy
from mopd.pipeline.sampler import release_parked_rows, sample_groups
from mopd.pipeline.submitter import Checkpointer, StepEvaluator, SubmitterState, submit_steps
from mopd.status import ServiceStatus
from mopd.tokenization import PromptRenderer
from mopd.types import Row, SampledGroup, ScoredGroup, TrainGroup

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class PipelineConfig:
    """The settings the stages use, resolved by the caller."""

    sources: list[Path]
    routes: RouteTable
    workers_by_route: Mapping[str, int]
    sampling: SamplingParams
    groups_per_step: int
    max_steps: int = 0
    max_policy_lag: int = 0
    epochs: int = 1
    max_line_bytes: int = 1 << 20
    loss_scale: float = 1.0
    loss_fn: str = "importance_sampling"
    discount: float = 0.0
    """Discount of future rewards added to each token's advantage; 0 adds none."""
    truncated_policy: str = "train"
    queue_size: int = 32
    route_queue_size: int = 8
    max_prompt_tokens: int | None = None
    steps_path: Path | None = None
    shutdown_grace_seconds: float = 30.0
    route_stall_seconds: float | None = None
    """A teacher call longer than this marks its route stalled (see ``dispatcher.py``); None never does."""
    resilience: ResiliencePolicy | None = None
    """Breaker, retry budget and parking of unavailable teachers (see ``resilience.py``); None rejects the rows
    of a failing teacher at once."""
    follow: FollowConfig | None = None
    """Tail the sources for new lines instead of reading them once (see ``follow.py``)."""


@dataclass
class PipelineResult:
    """Outcome of a finished run."""

    state: SubmitterState
    rows_rejected: int
    stopped_by: str
    """``end_of_input``, ``max_steps`` or ``signal``."""
    abandoned: bool = False
    """True when the grace period ran out and in-flight work was dropped."""
    rows_dead_lettered: int = 0


async def _guard(name: str, stage: Callable[[], Awaitable[None]], status: ServiceStatus | None = None) -> None:
    if status is not None:
        status.set_stage(name, "running")
    try:
        await stage()
    except anyio.get_cancelled_exc_class():
        if status is not None:
            status.set_stage(name, "cancelled")
        raise
    except Exception as exc:
        if status is not None:
            status.set_stage(name, "failed")
        log.error("stage_failed", stage=name, error=repr(exc))
        raise StageError(f"pipeline stage {name!r} failed: {exc!r}") from exc
    if status is not None:
        status.set_stage(name, "finished")


async def run_pipeline(
    config: PipelineConfig,
    *,
    sampler: StudentSampler,
    scorers: Mapping[str, TeacherScorer],
    trainer: Trainer,
    renderer: PromptRenderer,
    controller: ConcurrencyController,
    rejects: RejectsFile,
    metrics: Metrics,
    stop: anyio.Event,
    status: ServiceStatus | None = None,
    dead_letters: RejectsFile | None = None,
    progress: ProgressTracker | None = None,
    checkpointer: Checkpointer | None = None,
    initial_state: SubmitterState | None = None,
    evaluator: StepEvaluator | None = None,
) -> PipelineResult:
    """Run the five stages until the input ends, max_steps is reached or ``stop`` is set.

    :param dead_letters: where rows of an unavailable teacher go; required with ``config.resilience``.
    :param progress: the resume cursor the reader skips ended lines by and every row's end is recorded in.
    :param checkpointer: commits the trainer checkpoint with ``progress``; None never commits.
    :param initial_state: progress restored from the last checkpoint; ``max_steps`` counts from step 0 of the run.
    :param evaluator: evaluates the student every ``evaluator.every_steps`` steps; None never does.
    """
    missing = set(config.routes.messages_key_by_route) - set(scorers)
    if missing:
        raise StageError(f"no scorer for routes {sorted(missing)}; every route needs a teacher scorer")
    if config.resilience is not None and dead_letters is None:
        raise StageError("a resilience policy needs a dead-letter file for rows whose teacher stays down")

    state = initial_state or SubmitterState()
    if config.max_steps and state.steps >= config.max_steps:
        log.info("max_steps_already_reached", steps=state.steps, max_steps=config.max_steps)
        return PipelineResult(state=state, rows_rejected=rejects.count, stopped_by="max_steps")

    admission = RouteAdmission(
        {route: config.route_queue_size + config.workers_by_route.get(route, 1)
         for route in config.routes.messages_key_by_route},
        stall_seconds=config.route_stall_seconds, metrics=metrics, resilience=config.resilience,
    )
    # The gate counts steps of this process; max_steps counts those of the whole run.
    gate = StepGate(groups_per_step=config.groups_per_step, max_policy_lag=config.max_policy_lag,
                    max_steps=config.max_steps - state.steps if config.max_steps else 0)
    stopped_by = ["end_of_input"]

    def request_stop(reason: str) -> None:
        if not stop.is_set():
            stopped_by[0] = reason
            stop.set()
        gate.close()

    # 1. Bounded streams between the stages, one per route before the pools.
    send_rows, receive_rows = anyio.create_memory_object_stream[Row](config.queue_size)
    # Parked rows re-enter the sampler's input through a second sender (see sampler.release_parked_rows).
    parked_send = send_rows.clone() if config.resilience is not None else None
    send_groups, receive_groups = anyio.create_memory_object_stream[SampledGroup](config.queue_size)
    send_scored, receive_scored = anyio.create_memory_object_stream[ScoredGroup](config.queue_size)
    send_train, receive_train = anyio.create_memory_object_stream[TrainGroup](config.queue_size)
    route_streams = {
        route: anyio.create_memory_object_stream[SampledGroup](config.route_queue_size)
        for route in config.routes.messages_key_by_route
    }

    abandoned = False
    try:
        async with anyio.create_task_group() as tg:
            # 2. Watch for a stop request and bound the drain by the grace period.
            async def watch_stop() -> None:
                nonlocal abandoned
                await stop.wait()
                if status is not None:
                    status.set_phase("draining")
                if stopped_by[0] == "end_of_input":
                    stopped_by[0] = "signal"
                gate.close()
                log.info("pipeline_stopping", reason=stopped_by[0], grace_seconds=config.shutdown_grace_seconds)
                await anyio.sleep(config.shutdown_grace_seconds)
                abandoned = True
                log.warning("pipeline_drain_timed_out", grace_seconds=config.shutdown_grace_seconds)
                tg.cancel_scope.cancel()

            async def run_stages() -> None:
                route_sends = {route: send for route, (send, _) in route_streams.items()}
                guard = partial(_guard, status=status)
                async with anyio.create_task_group() as stages:
                    if config.follow is not None:
                        stages.start_soon(guard, "reader", partial(
                            follow_rows, send_rows, follow=config.follow, routes=config.routes, rejects=rejects,
                            metrics=metrics, stop=stop, max_line_bytes=config.max_line_bytes, progress=progress))
                    else:
                        stages.start_soon(guard, "reader", partial(
                            read_rows, send_rows, sources=config.sources, routes=config.routes, rejects=rejects,
                            metrics=metrics, stop=stop, epochs=config.epochs, max_line_bytes=config.max_line_bytes,
                            progress=progress))
                    if parked_send is not None and dead_letters is not None:
                        stages.start_soon(guard, "parking", partial(
                            release_parked_rows, parked_send, receive_rows, admission=admission, gate=gate,
                            dead_letters=dead_letters))
                    stages.start_soon(guard, "sampler", partial(
                        sample_groups, receive_rows, send_groups, sampler=sampler, renderer=renderer,
                        params=config.sampling, controller=controller, gate=gate, rejects=rejects, metrics=metrics,
                        max_prompt_tokens=config.max_prompt_tokens, admission=admission, dead_letters=dead_letters))
                    stages.start_soon(guard, "dispatcher", partial(
                        dispatch_groups, receive_groups, route_sends, metrics=metrics))
                    for route, (_, receive) in route_streams.items():
                        stages.start_soon(guard, f"pool:{route}", partial(
                            score_route, receive, send_scored.clone(), route=route, scorer=scorers[route],
                            renderer=renderer, workers=config.workers_by_route.get(route, 1), metrics=metrics,
                            admission=admission, gate=gate, dead_letters=dead_letters))
                    send_scored.close()
                    stages.start_soon(guard, "advantages", partial(
                        build_advantages, receive_scored, send_train, loss_scale=config.loss_scale,
                        truncated_policy=config.truncated_policy, gate=gate, rejects=rejects, metrics=metrics,
                        discount=config.discount, require_targets=config.loss_fn == "topk_forward_kl"))
                    stages.start_soon(guard, "submitter", partial(
                        submit_steps, receive_train, trainer=trainer, gate=gate, metrics=metrics, rejects=rejects,
                        state=state, groups_per_step=config.groups_per_step, max_steps=config.max_steps,
                        max_policy_lag=config.max_policy_lag, loss_fn=config.loss_fn, steps_path=config.steps_path,
                        on_max_steps=lambda: request_stop("max_steps"), checkpointer=checkpointer,
                        evaluator=evaluator))
                # 3. Every stage has drained: stop the watcher.
                tg.cancel_scope.cancel()

            tg.start_soon(watch_stop)
            tg.start_soon(run_stages)
    except BaseExceptionGroup as group:
        raise _first_stage_error(group) from group

    # 4. The closing commit: rows rejected or dead-lettered since the last
    # step become part of the cursor. A step cut short by an abandoned drain
    # may have changed the weights without its rows being recorded, so then
    # the last commit stays.
    if checkpointer is not None:
        if state.in_step:
            log.warning("final_checkpoint_skipped", reason="a step was cut short", last_step=state.steps)
        else:
            await checkpointer.commit(state)

    if state.abandoned_groups:
        log.info("groups_abandoned_after_max_steps", groups=state.abandoned_groups)
    return PipelineResult(state=state, rows_rejected=rejects.count, stopped_by=stopped_by[0], abandoned=abandoned,
                          rows_dead_lettered=dead_letters.count if dead_letters is not None else 0)


def _first_stage_error(group: BaseExceptionGroup) -> BaseException:
    """Pick the error that explains a failed run: a stage error before anything else."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first_stage_error(exc)
        if isinstance(exc, StageError):
            return exc
    return group.exceptions[0]
