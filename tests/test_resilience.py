"""Unavailable teachers: circuit breaker, retry budget, parked rows and dead letters."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import orjson
import pytest
from transformers import AutoTokenizer

from fakes import OracleTeacher, RecordingSampler, RecordingTrainer
from mopd.backends.base import SamplingParams, ScoredCompletion
from mopd.concurrency import FixedWindow
from mopd.errors import TeacherError
from mopd.metrics import Metrics
from mopd.pipeline.reader import DeadLetterFile, RejectsFile, RouteTable
from mopd.pipeline.resilience import BreakerState, CircuitBreaker, ResiliencePolicy, RetryBudget
from mopd.pipeline.service import PipelineConfig, run_pipeline
from mopd.tokenization import PromptRenderer
from mopd.types import Row

ROUTES = RouteTable(route_key="teacher",
                    messages_key_by_route={"math-teacher": "teacher_messages", "arithmetic-teacher": "teacher_messages"})


def row(row_id: str = "rows.jsonl:1") -> Row:
    return Row(row_id=row_id, source="rows.jsonl", line_number=1, route="math-teacher",
               messages=({"role": "user", "content": "hi"},), teacher_messages=None)


def test_breaker_opens_then_admits_one_probe() -> None:
    breaker = CircuitBreaker(failure_threshold=2, cooldown_seconds=1.0)
    assert not breaker.record_failure(0.0)
    assert breaker.record_failure(0.0)
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allows(row("a:1"), 0.5)

    assert breaker.allows(row("a:1"), 1.0)

    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allows(row("a:2"), 1.0)
    assert breaker.record_success()
    assert breaker.allows(row("a:2"), 1.0)


def test_failed_probe_doubles_the_cooldown() -> None:
    breaker = CircuitBreaker(failure_threshold=1, cooldown_seconds=1.0)
    breaker.record_failure(0.0)
    assert breaker.allows(row("a:1"), 1.0)

    breaker.record_failure(1.0)

    assert breaker.state is BreakerState.OPEN
    assert not breaker.allows(row("a:2"), 2.5)
    assert breaker.allows(row("a:2"), 3.0)


def test_retry_budget_refills_with_successes() -> None:
    budget = RetryBudget(ratio=0.5, capacity=1.0)
    assert budget.try_spend()
    assert not budget.try_spend()
    budget.deposit()
    assert not budget.try_spend()
    budget.deposit()
    assert budget.try_spend()


@dataclass
class SwitchableTeacher:
    """A teacher that refuses connections while ``down`` is set."""

    name: str
    down: bool = False
    calls: int = 0

    async def score(self, prompt_ids_T: Sequence[int], completions_S: Sequence[Sequence[int]],
                    **_: object) -> list[ScoredCompletion]:
        self.calls += 1
        if self.down:
            raise TeacherError("connect_failed", f"{self.name}: connection refused")
        return [ScoredCompletion(logprobs_T=(-0.5,) * len(c), echoed_ids_T=tuple(c)) for c in completions_S]

    async def aclose(self) -> None:
        return None


@pytest.fixture
def renderer(tiny_models: Path) -> PromptRenderer:
    return PromptRenderer(AutoTokenizer.from_pretrained(tiny_models / "tokenizer"))


def write_rows(path: Path, count: int) -> Path:
    path.write_bytes(b"".join(
        orjson.dumps({"messages": [{"role": "user", "content": f"Solve {i} + 1."}],
                      "teacher": ("math-teacher", "arithmetic-teacher")[i % 2]}) + b"\n"
        for i in range(count)
    ))
    return path


async def run(tmp_path: Path, renderer: PromptRenderer, teachers: dict, *, rows: int, policy: ResiliencePolicy,
              during=None):  # noqa: ANN001 - an optional coroutine function
    metrics = Metrics()
    rejects = RejectsFile(tmp_path / "rejects.jsonl", metrics)
    dead_letters = DeadLetterFile(tmp_path / "dead_letters.jsonl", metrics)
    sampler = RecordingSampler(delay=0.002)
    config = PipelineConfig(
        sources=[write_rows(tmp_path / "rows.jsonl", rows)], routes=ROUTES,
        workers_by_route={route: 2 for route in teachers}, sampling=SamplingParams(n=2, max_tokens=8),
        groups_per_step=4, steps_path=tmp_path / "steps.jsonl", resilience=policy,
    )
    try:
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                if during is not None:
                    tg.start_soon(during)
                result = await run_pipeline(
                    config, sampler=sampler, scorers=teachers, trainer=RecordingTrainer(sampler=sampler),
                    renderer=renderer, controller=FixedWindow(4), rejects=rejects, metrics=metrics,
                    stop=anyio.Event(), dead_letters=dead_letters,
                )
    finally:
        rejects.close()
        dead_letters.close()
    trained = [i for line in (tmp_path / "steps.jsonl").read_bytes().splitlines() for i in orjson.loads(line)["row_ids"]]
    dead = [orjson.loads(line) for line in (tmp_path / "dead_letters.jsonl").read_bytes().splitlines()]
    return result, trained, dead, metrics


async def test_rows_wait_for_teacher_outage_and_are_trained(tmp_path: Path, renderer: PromptRenderer) -> None:
    math = SwitchableTeacher("math-teacher", down=True)
    teachers = {"math-teacher": math, "arithmetic-teacher": OracleTeacher(name="arithmetic-teacher")}

    async def recover() -> None:
        await anyio.sleep(0.6)
        math.down = False

    policy = ResiliencePolicy(dead_letter_seconds=20.0, failure_threshold=2, cooldown_seconds=0.1)
    result, trained, dead, metrics = await run(tmp_path, renderer, teachers, rows=24, policy=policy, during=recover)

    assert sorted(trained) == sorted(f"{tmp_path / 'rows.jsonl'}:{i}" for i in range(1, 25))
    assert len(trained) == len(set(trained))
    assert dead == []
    assert result.rows_rejected == 0
    assert metrics.value("mopd_teacher_route_outcomes_total", {"route": "math-teacher", "outcome": "parked"}) > 0
    assert metrics.value("mopd_teacher_route_breaker_state", {"route": "math-teacher"}) == 0


async def test_rows_of_dead_teacher_go_to_dead_letters(tmp_path: Path, renderer: PromptRenderer) -> None:
    teachers = {"math-teacher": SwitchableTeacher("math-teacher", down=True),
                "arithmetic-teacher": OracleTeacher(name="arithmetic-teacher")}
    policy = ResiliencePolicy(dead_letter_seconds=0.5, failure_threshold=1, cooldown_seconds=0.1)

    result, trained, dead, metrics = await run(tmp_path, renderer, teachers, rows=20, policy=policy)

    path = tmp_path / "rows.jsonl"
    assert sorted(trained) == sorted(f"{path}:{i}" for i in range(2, 21, 2))
    assert sorted(r["row_id"] for r in dead) == sorted(f"{path}:{i}" for i in range(1, 20, 2))
    assert {r["reason"] for r in dead} == {"teacher_unavailable"}
    assert all(r["route"] == "math-teacher" for r in dead)
    assert all(orjson.loads(r["line"])["teacher"] == "math-teacher" for r in dead)
    assert result.rows_dead_lettered == 10
    assert metrics.value("mopd_rows_dead_lettered_total",
                         {"route": "math-teacher", "reason": "teacher_unavailable"}) == 10


async def test_storm_of_errors_is_retried_within_budget(tmp_path: Path, renderer: PromptRenderer) -> None:
    @dataclass
    class FlakyTeacher(SwitchableTeacher):
        """Fails every other call."""

        async def score(self, prompt_ids_T, completions_S, **kwargs):  # noqa: ANN001, ANN201
            self.down = self.calls % 2 == 0
            return await super().score(prompt_ids_T, completions_S, **kwargs)

    teachers = {"math-teacher": FlakyTeacher("math-teacher"), "arithmetic-teacher": OracleTeacher(name="arithmetic-teacher")}
    policy = ResiliencePolicy(dead_letter_seconds=20.0, failure_threshold=5, cooldown_seconds=0.05)

    _, trained, dead, metrics = await run(tmp_path, renderer, teachers, rows=16, policy=policy)

    assert len(trained) == 16
    assert len(set(trained)) == 16
    assert dead == []
    assert metrics.value("mopd_teacher_route_outcomes_total", {"route": "math-teacher", "outcome": "retried"}) > 0
