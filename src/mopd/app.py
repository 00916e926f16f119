"""Wire settings, backends, metrics and the pipeline into one run."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson
import structlog

from mopd.backends.base import SamplingParams
from mopd.concurrency import build_controller
from mopd.metrics import Metrics
from mopd.pipeline.checkpoint import Checkpoint, StateStore
from mopd.pipeline.follow import FollowConfig
from mopd.pipeline.progress import ProgressTracker
from mopd.pipeline.reader import DeadLetterFile, RejectsFile, RouteTable, expand_sources
from mopd.pipeline.resilience import ResiliencePolicy
from mopd.pipeline.service import PipelineConfig, PipelineResult, run_pipeline
from mopd.pipeline.submitter import Checkpointer, RouteHistory, StepEvaluator, SubmitterState
from mopd.settings import SINGLE_TEACHER_VAR, Settings, TeacherConfig, resolve_teachers
from mopd.status import ServiceStatus

if TYPE_CHECKING:
    from mopd.backends.factory import Backends

log = structlog.get_logger(__name__)

# Embedded demo: steps and batch shape that fit a few minutes on 2 CPU cores.
DEMO_MAX_STEPS = 750
DEMO_GROUPS_PER_STEP = 16
DEMO_MAX_TOKENS = 16


@dataclass
class RunOutcome:
    """A finished run and where its summary is."""

    summary_path: Path
    summary: dict[str, Any]
    result: PipelineResult


def demo_settings(settings: Settings) -> Settings:
    """Fill the settings of the embedded demo from its cached assets, building them on first use."""
    from mopd.demo import ensure_demo

    assets = ensure_demo(settings.demo_dir)
    teachers = [TeacherConfig(model=str(path), route=route) for route, path in sorted(assets.teacher_dirs.items())]
    updates: dict[str, Any] = {
        "data_path": str(assets.train_path),
        "eval_path": settings.eval_path or str(assets.heldout_path),
        "student_model": str(assets.student_dir),
        "teachers_json": teachers,
        "distillation_teachers": None, "opd_teachers": None, "distillation_teacher_model": None,
        "route_key": "teacher",
        "epochs": 0,
    }
    fields_set = settings.model_fields_set
    if "max_steps" not in fields_set:
        updates["max_steps"] = DEMO_MAX_STEPS
    if "prompt_groups_per_step" not in fields_set:
        updates["prompt_groups_per_step"] = DEMO_GROUPS_PER_STEP
    if "max_tokens" not in fields_set:
        updates["max_tokens"] = DEMO_MAX_TOKENS
    if "student_concurrency" not in fields_set:
        updates["student_concurrency"] = DEMO_GROUPS_PER_STEP
    log.info("demo_assets_ready", root=str(assets.root), train=str(assets.train_path), heldout=str(assets.heldout_path))
    return settings.model_copy(update=updates)


def route_table(settings: Settings, teachers: list[TeacherConfig], source: str | None) -> RouteTable:
    single = teachers[0].route if source == SINGLE_TEACHER_VAR else None
    return RouteTable(
        route_key=settings.effective_route_key,
        messages_key_by_route={t.route: t.messages_key for t in teachers},
        single_route=single,
    )


def _read_eval_rows(path: str | None) -> list[dict[str, Any]]:
    if not path:
        return []
    rows = []
    for line in Path(path).read_bytes().splitlines():
        if line.strip():
            rows.append(orjson.loads(line))
    return rows


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    tmp.replace(path)


async def run(
    settings: Settings, *, metrics: Metrics, stop: anyio.Event, status: ServiceStatus | None = None
) -> RunOutcome:
    """Run the service until its input ends, max_steps, or ``stop``; write the summary JSON."""
    from mopd.backends.factory import build_backends
    from mopd.evaluation import evaluate_accuracy

    started = time.monotonic()
    if status is None:
        status = ServiceStatus(metrics)
    status.set_phase("loading_backends")
    if settings.is_demo:
        settings = demo_settings(settings)
    teachers, source, shadowed = resolve_teachers(settings)
    if shadowed:
        log.warning("teacher_variables_shadowed", used=source, ignored=shadowed)
    routes = route_table(settings, teachers, source)

    # Logs written after the last commit belong to work that will be done again.
    store, log_paths, checkpoint = open_state(settings)
    progress = ProgressTracker.from_cursor(checkpoint.cursor) if checkpoint is not None else ProgressTracker()
    backends = await anyio.to_thread.run_sync(build_backends, settings)
    rejects = RejectsFile(settings.effective_rejects_path, metrics, progress=progress)
    dead_letters = DeadLetterFile(settings.effective_dead_letter_path, metrics, progress=progress)
    store.logs = {"steps": log_paths["steps"], "rejects": rejects.log, "dead_letters": dead_letters.log}
    status.set_routes(routes.messages_key_by_route)
    status.set_phase("evaluating")
    try:
        # 1. Restore the last commit, or commit the starting point. A served
        # student gets the restored weights before anything samples from it.
        checkpoint = await store.restore(backends.trainer)
        initial_state = restored_state(checkpoint, log_paths["steps"], rejects=rejects, dead_letters=dead_letters)
        checkpointer = Checkpointer(store=store, trainer=backends.trainer, progress=progress, metrics=metrics,
                                    rejects=rejects, dead_letters=dead_letters,
                                    every_steps=settings.checkpoint_every_steps)
        if checkpoint is None:
            await checkpointer.commit(initial_state)

        # 2. Measure the starting point on the held-out rows (after a restart, the restored weights).
        eval_rows = _read_eval_rows(settings.eval_path)
        route_key = settings.effective_route_key
        before: dict[str, float] = {}
        teacher_accuracy: dict[str, float] = {}
        if eval_rows:
            before = await evaluate_accuracy(backends.sampler, backends.renderer, eval_rows, route_key=route_key,
                                             max_tokens=settings.eval_max_tokens)
            for route, teacher_sampler in backends.teacher_samplers.items():
                scores = await evaluate_accuracy(teacher_sampler, backends.renderer, eval_rows, route_key=route_key,
                                                 max_tokens=settings.eval_max_tokens, route=route)
                teacher_accuracy[route] = scores.get(route, float("nan"))
            log.info("evaluated_before", student=before, teachers=teacher_accuracy)

        # 3. Distill.
        sampling = SamplingParams(n=settings.completions_per_prompt, max_tokens=settings.max_tokens,
                                  temperature=settings.temperature, seed=settings.seed)
        max_prompt = None
        if backends.context_window:
            max_prompt = backends.context_window - settings.max_tokens
        config = PipelineConfig(
            sources=[] if settings.follow else expand_sources(settings.data_path or ""),
            routes=routes,
            workers_by_route={t.route: settings.teacher_workers_for(t) for t in teachers},
            sampling=sampling,
            groups_per_step=settings.prompt_groups_per_step,
            max_steps=settings.max_steps,
            max_policy_lag=settings.max_policy_lag,
            epochs=settings.epochs,
            max_line_bytes=settings.max_line_bytes,
            loss_scale=settings.loss_scale,
            loss_fn=settings.loss_fn,
            truncated_policy=settings.truncated_policy,
            queue_size=settings.queue_size,
            route_queue_size=settings.teacher_queue_size,
            max_prompt_tokens=max_prompt,
            steps_path=settings.state_dir / "steps.jsonl",
            shutdown_grace_seconds=settings.shutdown_grace_seconds,
            route_stall_seconds=settings.route_stall_seconds,
            discount=settings.discount,
            resilience=resilience_policy(settings),
            follow=FollowConfig(path=settings.data_path or "", poll_seconds=settings.follow_poll_seconds)
            if settings.follow else None,
        )
        controller = build_controller(settings, metrics=metrics)
        log.info("pipeline_starting", routes=sorted(routes.messages_key_by_route), steps=settings.max_steps,
                 groups_per_step=settings.prompt_groups_per_step)
        status.set_phase("training")
        scorers = training_scorers(settings, backends, teachers)
        evaluator = step_evaluator(settings, backends, eval_rows, routes=routes, metrics=metrics)
        result = await run_pipeline(
            config, sampler=backends.sampler, scorers=scorers, trainer=backends.trainer,
            renderer=backends.renderer, controller=controller, rejects=rejects, metrics=metrics, stop=stop,
            status=status, dead_letters=dead_letters, progress=progress, checkpointer=checkpointer,
            initial_state=initial_state, evaluator=evaluator,
        )
        status.set_phase("finishing")

        # 4. Measure again and write the summary.
        after: dict[str, float] = {}
        if eval_rows and result.stopped_by != "signal":
            after = await evaluate_accuracy(backends.sampler, backends.renderer, eval_rows, route_key=route_key,
                                            max_tokens=settings.eval_max_tokens)
        summary = build_summary(settings=settings, result=result, before=before, after=after,
                                teacher_accuracy=teacher_accuracy, wall_seconds=time.monotonic() - started)
        summary_path = settings.state_dir / "summary.json"
        _write_json_atomic(summary_path, summary)
        log.info("run_finished", summary=str(summary_path), steps=summary["steps"], stopped_by=result.stopped_by)
        status.set_phase("finished")
        return RunOutcome(summary_path=summary_path, summary=summary, result=result)
    finally:
        rejects.close()
        dead_letters.close()
        # Shielded: after a forced stop the device threads must still be joined,
        # since a torch call running at interpreter shutdown aborts the process.
        with anyio.CancelScope(shield=True):
            await backends.aclose()


def training_scorers(settings: Settings, backends: Backends, teachers: list[TeacherConfig]) -> dict[str, Any]:
    """Return the scorers the pipeline trains with: the routed teachers, or their top-K blends for topk_forward_kl."""
    if settings.loss_fn != "topk_forward_kl":
        return dict(backends.scorers)
    from mopd.topk import blend_scorers, check_topk_size

    check_topk_size(settings.topk, vocab_size=len(backends.renderer.tokenizer))
    weights = {teacher.route: teacher.weight for teacher in teachers}
    log.info("topk_targets", k=settings.topk, blend=settings.topk_blend, weights=weights,
             route_weight=settings.topk_route_weight)
    return dict(blend_scorers(backends.scorers, weights=weights, k=settings.topk, mode=settings.topk_blend,
                              own_route_factor=settings.topk_route_weight))


def step_evaluator(
    settings: Settings, backends: Backends, eval_rows: list[dict[str, Any]], *, routes: RouteTable, metrics: Metrics
) -> StepEvaluator | None:
    """Evaluation during training, every MOPD_EVAL_EVERY_STEPS steps; None when off or without held-out rows."""
    from mopd.evaluation import build_teacher_traces, evaluate_accuracy, trace_logprob_gap

    if not settings.eval_every_steps or not eval_rows:
        return None
    route_key = settings.effective_route_key
    traces: list[Any] | None = None

    async def evaluate(step: int) -> dict[str, float]:
        nonlocal traces
        figures: dict[str, float] = {}
        accuracy = await evaluate_accuracy(backends.sampler, backends.renderer, eval_rows, route_key=route_key,
                                           max_tokens=settings.eval_max_tokens)
        for route, value in accuracy.items():
            figures[f"eval/{route}/accuracy"] = value
            metrics.eval_accuracy.labels(route=route).set(value)

        # Teacher traces do not change (teachers are frozen), so they are sampled once.
        if backends.student_scorer is not None:
            if traces is None:
                traces = await build_teacher_traces(
                    teacher_samplers=backends.teacher_samplers, scorers=backends.scorers, renderer=backends.renderer,
                    rows=eval_rows, route_key=route_key, messages_key_by_route=routes.messages_key_by_route,
                    max_tokens=settings.eval_max_tokens,
                )
            for route, gap in (await trace_logprob_gap(backends.student_scorer, traces)).items():
                figures[f"eval/{route}/trace_logprob_gap"] = gap
                metrics.eval_trace_logprob_gap.labels(route=route).set(gap)
        log.info("evaluated_during_training", step=step, **{k.replace("/", "_"): round(v, 4) for k, v in figures.items()})
        return figures

    return StepEvaluator(every_steps=settings.eval_every_steps, evaluate=evaluate)


def open_state(settings: Settings) -> tuple[StateStore, dict[str, Path], Checkpoint | None]:
    """Read the last commit of the state directory and cut the logs back to it."""
    store = StateStore(settings.state_dir, keep=settings.checkpoint_keep)
    paths = {
        "steps": settings.state_dir / "steps.jsonl",
        "rejects": settings.effective_rejects_path,
        "dead_letters": settings.effective_dead_letter_path,
    }
    checkpoint = store.load()
    removed = StateStore.truncate_logs(paths, checkpoint.log_lengths if checkpoint is not None else {})
    if checkpoint is not None or removed:
        log.info("state_reconciled", state_dir=str(settings.state_dir),
                 step=checkpoint.step if checkpoint is not None else None, bytes_removed=removed)
    return store, paths, checkpoint


def restored_state(
    checkpoint: Checkpoint | None, steps_path: Path, *, rejects: RejectsFile, dead_letters: RejectsFile
) -> SubmitterState:
    """Return the submitter progress at the last commit, with the per-route history read back from the
    step log, and set the counts of rejected and dead-lettered rows."""
    state = SubmitterState()
    if checkpoint is None:
        return state
    rejects.count = checkpoint.counters.get("rows_rejected", 0)
    dead_letters.count = checkpoint.counters.get("rows_dead_lettered", 0)
    state.steps = checkpoint.step
    state.policy_version = checkpoint.policy_version
    state.rows_trained = checkpoint.counters.get("rows_trained", 0)
    if steps_path.is_file():
        with steps_path.open("rb") as handle:
            for line in handle:
                record = orjson.loads(line)
                for key, tokens in record.items():
                    if key.startswith("route/") and key.endswith("/tokens"):
                        route = key[len("route/"):-len("/tokens")]
                        kl_sum = record.get(f"route/{route}/reverse_kl", 0.0) * max(tokens, 1)
                        history = state.routes.setdefault(route, RouteHistory())
                        history.steps.append(record["step"])
                        history.tokens.append(tokens)
                        history.reverse_kl_sums.append(kl_sum)
    return state


def resilience_policy(settings: Settings) -> ResiliencePolicy:
    return ResiliencePolicy(
        dead_letter_seconds=settings.dead_letter_seconds,
        failure_threshold=settings.teacher_breaker_failures,
        cooldown_seconds=settings.teacher_breaker_cooldown_seconds,
        retry_budget_ratio=settings.teacher_retry_budget_ratio,
        max_parked_rows=settings.teacher_max_parked_rows,
    )


def build_summary(
    *,
    settings: Settings,
    result: PipelineResult,
    before: dict[str, float],
    after: dict[str, float],
    teacher_accuracy: dict[str, float],
    wall_seconds: float,
) -> dict[str, Any]:
    state = result.state
    route_names = sorted(set(state.routes) | set(before) | set(teacher_accuracy))
    routes: dict[str, Any] = {}
    for route in route_names:
        history = state.routes.get(route)
        routes[route] = {
            "accuracy_before": before.get(route),
            "accuracy_after": after.get(route),
            "teacher_accuracy": teacher_accuracy.get(route),
            "reverse_kl_first": history.mean_reverse_kl(first=True) if history else None,
            "reverse_kl_last": history.mean_reverse_kl(first=False) if history else None,
            "tokens_trained": sum(history.tokens) if history else 0,
        }
    return {
        "routes": routes,
        "steps": state.steps,
        "wall_seconds": round(wall_seconds, 2),
        "rows_trained": result.state.rows_trained,
        "rows_rejected": result.rows_rejected,
        "rows_dead_lettered": result.rows_dead_lettered,
        "stopped_by": result.stopped_by,
        "policy_version": state.policy_version,
        "settings": {
            "prompt_groups_per_step": settings.prompt_groups_per_step,
            "completions_per_prompt": settings.completions_per_prompt,
            "learning_rate": settings.learning_rate,
            "max_tokens": settings.max_tokens,
            "temperature": settings.temperature,
            "max_policy_lag": settings.max_policy_lag,
        },
    }
