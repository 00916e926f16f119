"""Wire settings, backends, metrics and the pipeline into one run."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import orjson
import structlog

from mopd.backends.base import SamplingParams
from mopd.concurrency import build_controller
from mopd.metrics import Metrics
from mopd.pipeline.reader import RejectsFile, RouteTable, expand_sources
from mopd.pipeline.service import PipelineConfig, PipelineResult, run_pipeline
from mopd.settings import SINGLE_TEACHER_VAR, Settings, TeacherConfig, resolve_teachers
from mopd.status import ServiceStatus

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

    backends = await anyio.to_thread.run_sync(build_backends, settings)
    rejects = RejectsFile(settings.effective_rejects_path, metrics)
    status.set_routes(routes.messages_key_by_route)
    status.set_phase("evaluating")
    try:
        # 1. Measure the starting point on the held-out rows.
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

        # 2. Distill.
        sampling = SamplingParams(n=settings.completions_per_prompt, max_tokens=settings.max_tokens,
                                  temperature=settings.temperature, seed=settings.seed)
        max_prompt = None
        if backends.context_window:
            max_prompt = backends.context_window - settings.max_tokens
        config = PipelineConfig(
            sources=expand_sources(settings.data_path or ""),
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
        )
        controller = build_controller(settings, metrics=metrics)
        log.info("pipeline_starting", routes=sorted(routes.messages_key_by_route), steps=settings.max_steps,
                 groups_per_step=settings.prompt_groups_per_step)
        status.set_phase("training")
        result = await run_pipeline(
            config, sampler=backends.sampler, scorers=backends.scorers, trainer=backends.trainer,
            renderer=backends.renderer, controller=controller, rejects=rejects, metrics=metrics, stop=stop,
            status=status,
        )
        status.set_phase("finishing")

        # 3. Measure again and write the summary.
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
        await backends.aclose()


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
