"""``mopd check-data``: find privileged-prompt rows that leak or lack their answer.

A privileged row carries a teacher prompt (the teacher's messages key, else
``teacher_messages``, the same fallback the reader uses) that contains the
answer, while the student prompt must not. For every privileged row with an
answer this check reports:

    student_prompt_leaks_answer   the answer appears in the student messages
    teacher_prompt_lacks_answer   the answer does not appear in the teacher messages

The answer matches as a whole token: ``72`` matches in "is 72." but not in
"172" or "7.25". Rows that are not JSON objects, have no teacher prompt or
no answer are counted and skipped.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from mopd.pipeline.reader import DEFAULT_TEACHER_MESSAGES_KEY

LEAKS = "student_prompt_leaks_answer"
LACKS = "teacher_prompt_lacks_answer"


@dataclass(frozen=True, slots=True)
class Finding:
    """One row that fails the privileged-prompt check."""

    source: str
    line_number: int
    problem: str
    """``student_prompt_leaks_answer`` or ``teacher_prompt_lacks_answer``."""
    answer: str
    route: str | None

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "line_number": self.line_number, "problem": self.problem,
                "answer": self.answer, "route": self.route}


def contains_answer(messages: Any, answer: str) -> bool:
    """Return whether any message text contains ``answer`` as a whole token."""
    pattern = re.compile(r"(?<![0-9A-Za-z.])" + re.escape(answer) + r"(?![0-9A-Za-z]|\.[0-9])")
    return any(pattern.search(text) for text in _texts(messages))


def _texts(messages: Any) -> Iterator[str]:
    if not isinstance(messages, list):
        return
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    yield part["text"]


def check_rows(
    paths: Iterable[Path],
    *,
    messages_key: str = DEFAULT_TEACHER_MESSAGES_KEY,
    answer_key: str = "expected_answer",
    route_key: str = "teacher",
) -> tuple[list[Finding], Counter[str]]:
    """Check every row of ``paths``.

    :returns: the findings, and counts of ``rows``, ``privileged`` (checked)
        and ``skipped_<why>`` rows.
    """
    findings: list[Finding] = []
    counts: Counter[str] = Counter()
    keys = tuple(dict.fromkeys((messages_key, DEFAULT_TEACHER_MESSAGES_KEY)))
    for path in paths:
        with path.open("rb") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                counts["rows"] += 1
                try:
                    row = orjson.loads(line)
                except orjson.JSONDecodeError:
                    counts["skipped_invalid_json"] += 1
                    continue
                if not isinstance(row, dict):
                    counts["skipped_invalid_json"] += 1
                    continue
                teacher = next((row[key] for key in keys if row.get(key) is not None), None)
                if teacher is None:
                    counts["skipped_not_privileged"] += 1
                    continue
                answer = row.get(answer_key)
                if answer is None or isinstance(answer, (bool, dict, list)) or not str(answer).strip():
                    counts["skipped_no_answer"] += 1
                    continue
                counts["privileged"] += 1
                answer_text = str(answer).strip()
                route = row.get(route_key) if isinstance(row.get(route_key), str) else None
                if contains_answer(row.get("messages"), answer_text):
                    findings.append(Finding(source=str(path), line_number=line_number, problem=LEAKS,
                                            answer=answer_text, route=route))
                if not contains_answer(teacher, answer_text):
                    findings.append(Finding(source=str(path), line_number=line_number, problem=LACKS,
                                            answer=answer_text, route=route))
    return findings, counts
