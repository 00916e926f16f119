"""Greedy exact-match accuracy per route, through any student sampler."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import anyio

from mopd.backends.base import SamplingParams, StudentSampler
from mopd.demo.tasks import is_correct
from mopd.tokenization import PromptRenderer


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
