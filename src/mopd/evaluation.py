"""Held-out evaluation through any backend: greedy exact-match accuracy per
route, and the teacher-trace logprob gap."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from mopd.backends.base import SamplingParams, StudentSampler, TeacherScorer
from mopd.demo.tasks import is_correct
from mopd.tokenization import PromptRenderer

DEFAULT_TEACHER_MESSAGES_KEY = "teacher_messages"


async def evaluate_accuracy(
    sampler: StudentSampler,
    renderer: PromptRenderer,
    rows: Sequence[Mapping[str, Any]],
    *,
    route_key: str,
    max_tokens: int,
    concurrency: int = 64,
    route: str | None = None,
) -> dict[str, float]:
    """Return route -> fraction of rows whose greedy completion ends with the
    expected ``Final: X`` line. Rows without ``expected_answer`` are skipped.

    :param route: evaluate only rows of this route.
    """
    params = SamplingParams(n=1, max_tokens=max_tokens, temperature=0.0)
    correct: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    limiter = anyio.Semaphore(concurrency)

    async def one(row: Mapping[str, Any]) -> None:
        async with limiter:
            samples = await sampler.sample(renderer.encode(row["messages"]), params)
        text = renderer.decode(samples[0].completion_ids_T)
        key = str(row.get(route_key))
        total[key] += 1
        correct[key] += int(is_correct(text, str(row["expected_answer"])))

    selected = [
        row for row in rows
        if row.get("expected_answer") is not None and (route is None or row.get(route_key) == route)
    ]
    async with anyio.create_task_group() as tg:
        for row in selected:
            tg.start_soon(one, row)
    return {key: correct[key] / total[key] for key in sorted(total)}


TRACE_ROWS_PER_ROUTE = 16
"""Held-out rows per route whose teacher traces are scored at each evaluation."""


@dataclass(frozen=True, slots=True)
class TeacherTrace:
    """A greedy teacher completion and its logprobs under the teacher prompt."""

    route: str
    student_prompt_ids_T: tuple[int, ...]
    completion_ids_T: tuple[int, ...]
    teacher_logprob_mean: float
    """Mean per-token logprob of the completion under the teacher and the teacher prompt."""


def teacher_messages_of(row: Mapping[str, Any], messages_key: str) -> Any:
    """Return the row's teacher prompt: the teacher's key, else ``teacher_messages``, else the student messages."""
    for key in (messages_key, DEFAULT_TEACHER_MESSAGES_KEY):
        if row.get(key) is not None:
            return row[key]
    return row["messages"]


async def build_teacher_traces(
    *,
    teacher_samplers: Mapping[str, StudentSampler],
    scorers: Mapping[str, TeacherScorer],
    renderer: PromptRenderer,
    rows: Sequence[Mapping[str, Any]],
    route_key: str,
    messages_key_by_route: Mapping[str, str],
    max_tokens: int,
    rows_per_route: int = TRACE_ROWS_PER_ROUTE,
) -> list[TeacherTrace]:
    """Sample one greedy trace per held-out row (at most ``rows_per_route``) under the teacher prompt, and score it."""
    traces: list[TeacherTrace] = []
    params = SamplingParams(n=1, max_tokens=max_tokens, temperature=0.0)
    for route, sampler in sorted(teacher_samplers.items()):
        if route not in scorers:
            continue
        selected = [row for row in rows if row.get(route_key) == route][:rows_per_route]
        for row in selected:
            teacher_prompt = renderer.encode(teacher_messages_of(row, messages_key_by_route.get(route, "")))
            (sample,) = await sampler.sample(teacher_prompt, params)
            if not sample.completion_ids_T:
                continue
            (scored,) = await scorers[route].score(teacher_prompt, [sample.completion_ids_T])
            if scored.logprobs_T is None or not all(math.isfinite(v) for v in scored.logprobs_T):
                continue
            traces.append(TeacherTrace(
                route=route, student_prompt_ids_T=renderer.encode(row["messages"]),
                completion_ids_T=sample.completion_ids_T,
                teacher_logprob_mean=sum(scored.logprobs_T) / len(scored.logprobs_T),
            ))
    return traces


async def trace_logprob_gap(student_scorer: TeacherScorer, traces: Sequence[TeacherTrace]) -> dict[str, float]:
    """Return route -> mean over traces of (teacher logprob under the teacher prompt) minus
    (student logprob under the student prompt), per token.

    The gap shrinks as the student learns to produce, from the student prompt
    alone, what the teacher produces with its (possibly privileged) prompt.
    """
    gaps: dict[str, list[float]] = defaultdict(list)
    for trace in traces:
        (scored,) = await student_scorer.score(trace.student_prompt_ids_T, [trace.completion_ids_T])
        if scored.logprobs_T is None or not all(math.isfinite(v) for v in scored.logprobs_T):
            continue
        student_mean = sum(scored.logprobs_T) / len(scored.logprobs_T)
        gaps[trace.route].append(trace.teacher_logprob_mean - student_mean)
    return {route: sum(values) / len(values) for route, values in sorted(gaps.items())}
