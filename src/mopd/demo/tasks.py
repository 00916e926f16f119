"""The two demo routes and their JSONL data sets.

``arithmetic-teacher`` handles addition of two 2-digit numbers and
``math-teacher`` multiplication of a 3-digit number by 2. Fixed operand widths
give every prompt of a route the same length, which keeps the tiny models' job
positional.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ARITHMETIC_ROUTE = "arithmetic-teacher"
MATH_ROUTE = "math-teacher"
ROUTES = (ARITHMETIC_ROUTE, MATH_ROUTE)

_FINAL_LINE = re.compile(r"^Final:\s*(?P<answer>.*?)\s*$")


@dataclass(frozen=True, slots=True)
class Problem:
    """One arithmetic question of a route."""

    route: str
    left: int
    right: int

    @property
    def operator(self) -> str:
        return "+" if self.route == ARITHMETIC_ROUTE else "*"

    @property
    def answer(self) -> str:
        value = self.left + self.right if self.route == ARITHMETIC_ROUTE else self.left * self.right
        return str(value)

    @property
    def question(self) -> str:
        return f"Solve {self.left} {self.operator} {self.right}. End with Final: <answer>."

    @property
    def completion(self) -> str:
        """Target completion text, without the EOS token."""
        return f"Final: {self.answer}"

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}]

    def to_row(self) -> dict[str, Any]:
        """Return the JSONL row that the pipeline reads."""
        return {"messages": self.messages(), "teacher": self.route, "expected_answer": self.answer}


def all_problems(*, route: str) -> list[Problem]:
    """Return every problem of ``route`` in a fixed order.

    Addition covers every pair of two-digit numbers (8,100 problems) and
    multiplication every 3-digit number times 2 (900 problems), so both routes
    keep their held-out problems out of training. Each answer digit depends on
    a few operand digits. A tiny model generalizes that rule, so what on-policy
    distillation teaches on one problem carries over to the others.
    A route of unrelated facts, such as a times table, learns far more slowly,
    because the student is rewarded for each right answer only after it
    samples that answer.
    """
    if route == ARITHMETIC_ROUTE:
        return [Problem(route, left, right) for left in range(10, 100) for right in range(10, 100)]
    if route == MATH_ROUTE:
        return [Problem(route, left, 2) for left in range(100, 1000)]
    raise ValueError(f"invalid demo route {route!r}: expected one of {ROUTES}")


@dataclass(frozen=True, slots=True)
class ProblemSplit:
    """Training and held-out problems of one route, disjoint."""

    train: tuple[Problem, ...]
    heldout: tuple[Problem, ...]


def split_problems(*, route: str, heldout_count: int, seed: int) -> ProblemSplit:
    """Shuffle the problems of ``route`` with ``seed`` and hold out the first ``heldout_count``."""
    problems = all_problems(route=route)
    if not 1 <= heldout_count <= len(problems) // 4:
        raise ValueError(
            f"heldout_count must be between 1 and {len(problems) // 4} for route {route!r}, got {heldout_count}"
        )
    random.Random(f"{seed}:{route}").shuffle(problems)
    return ProblemSplit(train=tuple(problems[heldout_count:]), heldout=tuple(problems[:heldout_count]))


def sample_training_problems(*, split: ProblemSplit, count: int, seed: int) -> list[Problem]:
    """Draw ``count`` training problems, each pass over the pool in a new shuffled order.

    A route whose pool is smaller than ``count`` repeats problems, but every
    problem appears once before any appears twice.
    """
    rng = random.Random(seed)
    drawn: list[Problem] = []
    while len(drawn) < count:
        pool = list(split.train)
        rng.shuffle(pool)
        drawn.extend(pool[: count - len(drawn)])
    return drawn


def extract_final_answer(text: str) -> str | None:
    """Return ``X`` from the last non-empty line when it reads ``Final: X``, else None.

    Surrounding whitespace and one trailing period are dropped from ``X``.
    An empty ``X`` counts as missing.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    match = _FINAL_LINE.match(lines[-1])
    if match is None:
        return None
    answer = match.group("answer").removesuffix(".").strip()
    return answer or None


def _normalize_answer(answer: str) -> str:
    # Integers compare by value, so "1,000", "01000" and "1000" match.
    compact = answer.strip().replace(",", "")
    try:
        return str(int(compact))
    except ValueError:
        return compact


def is_correct(text: str, expected: str) -> bool:
    """Return whether the final answer in ``text`` equals ``expected`` as a number or string."""
    answer = extract_final_answer(text)
    if answer is None:
        return False
    return _normalize_answer(answer) == _normalize_answer(expected)


def write_jsonl(*, path: Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Write ``rows`` to ``path`` as JSON lines, flushed to disk, and return the row count."""
    count = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
            count += 1
        handle.flush()
        os.fsync(handle.fileno())
    return count


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read every non-blank line of ``path`` as one JSON object."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@dataclass(frozen=True, slots=True)
class DemoData:
    """The problems behind the written data files."""

    splits: Mapping[str, ProblemSplit]
    train_rows: tuple[Mapping[str, Any], ...]
    heldout_rows: tuple[Mapping[str, Any], ...]


def plan_datasets(
    *, seed: int, train_rows_per_route: int = 2000, heldout_per_route: int = 100
) -> DemoData:
    """Return the demo data for ``seed`` without writing it.

    Held-out problems never appear in the training rows. The training rows mix
    both routes in one seeded shuffle, and the held-out rows list each route's
    problems in a block, route by route.
    """
    splits = {
        route: split_problems(route=route, heldout_count=heldout_per_route, seed=seed) for route in ROUTES
    }
    train_problems: list[Problem] = []
    for index, route in enumerate(ROUTES):
        train_problems.extend(
            sample_training_problems(split=splits[route], count=train_rows_per_route, seed=seed + 1 + index)
        )
    random.Random(seed).shuffle(train_problems)
    train_rows = tuple(problem.to_row() for problem in train_problems)
    heldout_rows = tuple(problem.to_row() for route in ROUTES for problem in splits[route].heldout)
    return DemoData(splits=splits, train_rows=train_rows, heldout_rows=heldout_rows)


def build_datasets(*, train_path: Path, heldout_path: Path, seed: int) -> DemoData:
    """Write the training and held-out files planned by ``plan_datasets`` and return the data."""
    data = plan_datasets(seed=seed)
    write_jsonl(path=train_path, rows=data.train_rows)
    write_jsonl(path=heldout_path, rows=data.heldout_rows)
    return data


def rows_for_route(rows: Sequence[Mapping[str, Any]], *, route: str) -> list[Mapping[str, Any]]:
    """Return the rows whose ``teacher`` field is ``route``."""
    return [row for row in rows if row.get("teacher") == route]
