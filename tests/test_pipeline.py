"""The five-stage pipeline with hand-made backends."""

from __future__ import annotations

from pathlib import Path

import anyio
import orjson
import pytest
from transformers import AutoTokenizer

from fakes import OracleTeacher, RecordingSampler, RecordingTrainer
from mopd.backends.base import SamplingParams
from mopd.concurrency import FixedWindow
from mopd.errors import StageError
from mopd.metrics import Metrics
from mopd.pipeline.reader import RejectsFile, RouteTable
from mopd.pipeline.service import PipelineConfig, run_pipeline
from mopd.tokenization import PromptRenderer

ROUTES = RouteTable(route_key="teacher",
                    messages_key_by_route={"math-teacher": "teacher_messages", "arithmetic-teacher": "teacher_messages"})


def write_rows(path: Path, count: int, *, routes: tuple[str, ...] = ("math-teacher", "arithmetic-teacher")) -> Path:
    lines = []
    for i in range(count):
        row = {"messages": [{"role": "user", "content": f"Solve {i} + 1."}], "teacher": routes[i % len(routes)]}
        if i % 3 == 0:
            row["teacher_messages"] = [{"role": "user", "content": f"Solve {i} + 1. The answer is {i + 1}."}]
        lines.append(orjson.dumps(row))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture
def renderer(tiny_models: Path) -> PromptRenderer:
    return PromptRenderer(AutoTokenizer.from_pretrained(tiny_models / "tokenizer"))


async def run(tmp_path: Path, renderer: PromptRenderer, *, rows: int = 20, groups_per_step: int = 4,
              teachers: dict | None = None, sampler: RecordingSampler | None = None, stop: anyio.Event | None = None,
              **config):
    sampler = sampler or RecordingSampler()
    trainer = RecordingTrainer(sampler=sampler)
    teachers = teachers or {route: OracleTeacher(name=route) for route in ROUTES.messages_key_by_route}
    metrics = Metrics()
    rejects = RejectsFile(tmp_path / "rejects.jsonl", metrics)
    pipeline_config = PipelineConfig(
        sources=[write_rows(tmp_path / "rows.jsonl", rows)], routes=ROUTES,
        workers_by_route={route: 2 for route in teachers}, sampling=SamplingParams(n=2, max_tokens=8),
        groups_per_step=groups_per_step, steps_path=tmp_path / "steps.jsonl", **config,
    )
    try:
        with anyio.fail_after(30):
            result = await run_pipeline(
                pipeline_config, sampler=sampler, scorers=teachers, trainer=trainer, renderer=renderer,
                controller=FixedWindow(4), rejects=rejects, metrics=metrics, stop=stop or anyio.Event(),
            )
    finally:
        rejects.close()
    return result, sampler, trainer, teachers, metrics


def step_records(tmp_path: Path) -> list[dict]:
    return [orjson.loads(line) for line in (tmp_path / "steps.jsonl").read_bytes().splitlines()]


async def test_every_row_is_trained_once(tmp_path: Path, renderer: PromptRenderer) -> None:
    result, _, trainer, _, metrics = await run(tmp_path, renderer, rows=22, groups_per_step=4)

    trained = [row_id for record in step_records(tmp_path) for row_id in record["row_ids"]]
    assert sorted(trained) == sorted(f"{tmp_path / 'rows.jsonl'}:{i}" for i in range(1, 23))
    assert len(trainer.steps) == 6  # five full steps and the partial last one
    assert result.stopped_by == "end_of_input"
    assert metrics.value("mopd_teacher_route_scored_total", {"route": "math-teacher"}) == 11
    assert metrics.value("mopd_teacher_route_scored_total", {"route": "arithmetic-teacher"}) == 11
    assert metrics.value("mopd_train_steps_total") == 6
    assert metrics.value("mopd_policy_version") == 6


async def test_teacher_scores_sampled_ids_after_its_prompt(tmp_path: Path, renderer: PromptRenderer) -> None:
    _, sampler, _, teachers, _ = await run(tmp_path, renderer, rows=6, groups_per_step=2)

    rows = [orjson.loads(line) for line in (tmp_path / "rows.jsonl").read_bytes().splitlines()]
    student_prompts = {renderer.encode(row["messages"]) for row in rows}
    assert set(sampler.prompts) == student_prompts
    for row in rows:
        teacher = teachers[row["teacher"]]
        expected = renderer.encode(row.get("teacher_messages") or row["messages"])
        assert any(prompt == expected for prompt, _ in teacher.calls)
    for teacher in teachers.values():
        for _, completions in teacher.calls:
            assert completions == (sampler.completion, sampler.completion)


async def test_strict_mode_trains_only_latest_policy(tmp_path: Path, renderer: PromptRenderer) -> None:
    _, _, trainer, _, _ = await run(tmp_path, renderer, rows=24, groups_per_step=4)

    versions = [record["policy_version"] for record in step_records(tmp_path)]
    assert versions == list(range(1, 7))
    # Every sample of step s came from version s - 1, the weights of the step before.
    assert len(trainer.steps) == 6


async def test_max_steps_stops_the_run(tmp_path: Path, renderer: PromptRenderer) -> None:
    result, _, trainer, _, _ = await run(tmp_path, renderer, rows=40, groups_per_step=4, max_steps=3)
    assert len(trainer.steps) == 3
    assert result.stopped_by == "max_steps"
    assert result.state.abandoned_groups == 0


async def test_failing_teacher_rows_go_to_rejects(tmp_path: Path, renderer: PromptRenderer) -> None:
    from mopd.errors import TeacherError

    teachers = {
        "math-teacher": OracleTeacher(name="math-teacher", fail_with=TeacherError("timeout", "timed out")),
        "arithmetic-teacher": OracleTeacher(name="arithmetic-teacher"),
    }
    result, _, _, _, metrics = await run(tmp_path, renderer, rows=10, groups_per_step=2, teachers=teachers)

    rejected = [orjson.loads(x) for x in (tmp_path / "rejects.jsonl").read_bytes().splitlines()]
    assert sorted(r["line_number"] for r in rejected) == [1, 3, 5, 7, 9]
    assert {r["reason"] for r in rejected} == {"no_trainable_samples"}
    assert "teacher_timeout=2" in rejected[0]["message"]
    assert result.state.rows_trained == 5
    assert metrics.value("mopd_samples_rejected_total", {"route": "math-teacher", "reason": "teacher_timeout"}) == 10


async def test_stage_crash_stops_service_with_stage_name(tmp_path: Path, renderer: PromptRenderer) -> None:
    teachers = {
        "math-teacher": OracleTeacher(name="math-teacher", fail_with=RuntimeError("scorer bug")),
        "arithmetic-teacher": OracleTeacher(name="arithmetic-teacher"),
    }
    with pytest.raises(StageError, match="pool:math-teacher.*scorer bug"):
        await run(tmp_path, renderer, rows=10, groups_per_step=2, teachers=teachers)


async def test_stop_event_drains_and_returns(tmp_path: Path, renderer: PromptRenderer) -> None:
    stop = anyio.Event()
    sampler = RecordingSampler(delay=0.01)

    async def stop_soon() -> None:
        await anyio.sleep(0.2)
        stop.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_soon)
        result, _, trainer, _, _ = await run(tmp_path, renderer, rows=1000, groups_per_step=4,
                                             sampler=sampler, stop=stop)

    assert result.stopped_by == "signal"
    assert not result.abandoned
    trained = sum(len(record["row_ids"]) for record in step_records(tmp_path))
    assert 0 < trained < 1000
    assert trained == result.state.rows_trained


async def test_route_history_gives_first_and_last_reverse_kl(tmp_path: Path, renderer: PromptRenderer) -> None:
    result, _, _, _, _ = await run(tmp_path, renderer, rows=40, groups_per_step=2)

    history = result.state.routes["math-teacher"]
    assert len(history.steps) == 20
    # The fakes sample at logprob -1.0 and the oracle scores -0.5: reverse KL is -0.5 per token.
    assert history.mean_reverse_kl(first=True) == pytest.approx(-0.5)
    assert history.mean_reverse_kl(first=False) == pytest.approx(-0.5)
    assert result.state.steps == 20
    assert result.state.policy_version == 20
