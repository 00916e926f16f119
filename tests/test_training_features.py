"""Evaluation during training, top-K and LoRA runs of the service, discounting, privileged-prompt
fallbacks and checks, and the teacher tokenizer check."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import orjson
import pytest

from mopd.app import run
from mopd.cli import main
from mopd.datacheck import LACKS, LEAKS, check_rows, contains_answer
from mopd.errors import ConfigError
from mopd.metrics import Metrics
from mopd.pipeline.advantages import discounted_advantages, make_datum
from mopd.pipeline.reader import RouteTable, parse_row
from mopd.settings import load_settings
from mopd.tokenization import check_teacher_tokenizer


def _write_eval_rows(path: Path, count: int = 6) -> Path:
    rows = []
    for i in range(count):
        route = ("math-teacher", "arithmetic-teacher")[i % 2]
        rows.append({"messages": [{"role": "user", "content": f"Solve {i} + 2. End with Final: <answer>."}],
                     "teacher": route, "expected_answer": str(i + 2),
                     "teacher_messages": [{"role": "user", "content": f"Solve {i} + 2. It is {i + 2}."}]})
    path.write_bytes(b"\n".join(orjson.dumps(row) for row in rows) + b"\n")
    return path


def _env(tiny_models: Path, tmp_path: Path, **extra: str) -> dict[str, str]:
    eval_path = _write_eval_rows(tmp_path / "heldout.jsonl")
    env = {
        "DISTILLATION_TEACHERS": "math-teacher,arithmetic-teacher",
        "MOPD_DATA_PATH": str(eval_path),
        "MOPD_EVAL_PATH": str(eval_path),
        "MOPD_MODEL_ROOT": str(tiny_models),
        "MOPD_STUDENT_MODEL": "student",
        "MOPD_STATE_DIR": str(tmp_path / "state"),
        "MOPD_MAX_TOKENS": "4",
        "MOPD_EVAL_MAX_TOKENS": "4",
        "MOPD_COMPLETIONS_PER_PROMPT": "2",
        "MOPD_PROMPT_GROUPS_PER_STEP": "2",
        "MOPD_EPOCHS": "0",
        "MOPD_MAX_STEPS": "4",
        "MOPD_TORCH_THREADS": "2",
        "MOPD_METRICS_ENABLED": "false",
    }
    env.update(extra)
    return env


async def _run(env: dict[str, str]) -> tuple[dict, list[dict]]:
    settings = load_settings(env)
    with anyio.fail_after(120):
        outcome = await run(settings, metrics=Metrics(), stop=anyio.Event())
    steps = [orjson.loads(line) for line in (settings.state_dir / "steps.jsonl").read_bytes().splitlines()]
    return outcome.summary, steps


@pytest.mark.slow
async def test_evaluation_every_two_steps_reaches_step_log(tiny_models: Path, tmp_path: Path) -> None:
    summary, steps = await _run(_env(tiny_models, tmp_path, MOPD_EVAL_EVERY_STEPS="2"))
    assert summary["steps"] == 4
    evaluated = [record["step"] for record in steps if any(key.startswith("eval/") for key in record)]
    assert evaluated == [2, 4]
    for record in steps:
        if record["step"] in (2, 4):
            for route in ("math-teacher", "arithmetic-teacher"):
                assert 0.0 <= record[f"eval/{route}/accuracy"] <= 1.0
                assert isinstance(record[f"eval/{route}/trace_logprob_gap"], float)
    # The report draws these evaluations and both routes.
    assert main(["report", str(tmp_path / "state")]) == 0
    assert (tmp_path / "state" / "report.png").stat().st_size > 0


@pytest.mark.slow
async def test_topk_run_records_mass_and_entropy(tiny_models: Path, tmp_path: Path) -> None:
    summary, steps = await _run(_env(tiny_models, tmp_path, MOPD_LOSS_FN="topk_forward_kl", MOPD_TOPK="4",
                                     MOPD_TOPK_ROUTE_WEIGHT="4", MOPD_LORA_RANK="4"))
    assert summary["steps"] == 4
    routes = {key.split("/")[1] for record in steps for key in record if key.endswith("/topk_mass")}
    assert routes == {"math-teacher", "arithmetic-teacher"}
    for record in steps:
        for key, value in record.items():
            if key.endswith("/topk_mass"):
                assert 0.0 < value <= 1.0
            if key.endswith("/topk_entropy"):
                assert 0.0 <= value <= 1.3863  # at most log(4) nats for 4 candidates


def test_topk_above_vocabulary_stops_start_up(tiny_models: Path, tmp_path: Path) -> None:
    env = _env(tiny_models, tmp_path, MOPD_LOSS_FN="topk_forward_kl", MOPD_TOPK="5000")
    with pytest.raises(ConfigError, match="MOPD_TOPK=5000 is above the vocabulary size"):
        anyio.run(_run, env)


def test_discount_adds_future_rewards() -> None:
    assert discounted_advantages([1.0, 2.0, 4.0], 0.5) == [1.0 + 1.0 + 1.0, 2.0 + 2.0, 4.0]
    plain = make_datum(prompt_ids_T=[1, 2], completion_ids_T=[3, 4], sampling_logprobs_T=[-1.0, -1.0],
                       teacher_logprobs_T=[-0.5, -2.0], loss_scale=1.0)
    discounted = make_datum(prompt_ids_T=[1, 2], completion_ids_T=[3, 4], sampling_logprobs_T=[-1.0, -1.0],
                            teacher_logprobs_T=[-0.5, -2.0], loss_scale=1.0, discount=0.9)
    assert plain.advantages_T == (0.0, 0.5, -1.0)
    assert discounted.advantages_T == pytest.approx((0.0, 0.5 - 0.9, -1.0))


def test_discount_setting_is_bounded() -> None:
    with pytest.raises(ConfigError, match="MOPD_DISCOUNT"):
        load_settings({"MOPD_DISCOUNT": "1.5"})


ROUTES = RouteTable(route_key="teacher", messages_key_by_route={"math-teacher": "hint_messages"})
USER = [{"role": "user", "content": "Solve 2 + 2."}]
HINT = [{"role": "user", "content": "Solve 2 + 2. It is 4."}]


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        pytest.param({"hint_messages": HINT, "teacher_messages": USER}, HINT, id="own-key-first"),
        pytest.param({"teacher_messages": HINT}, HINT, id="shared-key-fallback"),
        pytest.param({}, None, id="student-prompt-fallback"),
    ],
)
def test_privileged_prompt_fallbacks(extra: dict, expected: list | None) -> None:
    row = parse_row(orjson.dumps({"messages": USER, "teacher": "math-teacher", **extra}), source="rows.jsonl",
                    line_number=1, routes=ROUTES)
    assert row.teacher_messages == (None if expected is None else tuple(expected))


def test_answer_matches_whole_token() -> None:
    assert contains_answer([{"role": "user", "content": "The correct answer is 72."}], "72")
    assert not contains_answer([{"role": "user", "content": "It is 172 or 7.25"}], "72")
    assert not contains_answer([{"role": "user", "content": "It is 72.5"}], "72")


def test_check_data_reports_leaks_and_missing_answers(tmp_path: Path, gsm8k_routed: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # The published rows are clean.
    findings, counts = check_rows([gsm8k_routed])
    assert findings == []
    assert counts["privileged"] == 50

    rows = [
        {"messages": [{"role": "user", "content": "Solve 40 + 2; the answer is 42."}], "expected_answer": "42",
         "teacher_messages": [{"role": "user", "content": "Solve 40 + 2. It is 42."}]},
        {"messages": [{"role": "user", "content": "Solve 40 + 3."}], "expected_answer": 43,
         "teacher_messages": [{"role": "user", "content": "Solve 40 + 3. Think hard."}]},
        {"messages": [{"role": "user", "content": "Solve 1 + 1."}], "expected_answer": "2"},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    assert main(["check-data", str(path)]) == 1
    out, err = capsys.readouterr()
    reported = [json.loads(line) for line in out.splitlines()]
    assert [(r["line_number"], r["problem"]) for r in reported] == [(1, LEAKS), (2, LACKS)]
    assert "3 rows, 2 privileged rows checked, 2 findings" in err


def test_declared_tokenizer_mismatch_names_both(tiny_models: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "tokenizer")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tokenizer.save_pretrained(tmp_path / "other")
    check_teacher_tokenizer(tiny_models / "student", tiny_models / "math-teacher", route="math")
    with pytest.raises(ConfigError) as raised:
        check_teacher_tokenizer(tiny_models / "student", tmp_path / "other", route="math")
    message = str(raised.value)
    assert str(tmp_path / "other") in message
    assert str(tiny_models / "student") in message
    assert "vocabulary fingerprint" in message


def test_declared_tokenizer_mismatch_stops_local_start_up(tiny_models: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from mopd.backends.local import build_local_backends

    tokenizer = AutoTokenizer.from_pretrained(tiny_models / "tokenizer")
    tokenizer.eos_token = tokenizer.pad_token
    tokenizer.save_pretrained(tmp_path / "other")
    teachers = json.dumps([{"model": "math-teacher", "tokenizer": str(tmp_path / "other")}])
    env = {"MOPD_TEACHERS": teachers, "MOPD_DATA_PATH": "x.jsonl", "MOPD_MODEL_ROOT": str(tiny_models),
           "MOPD_STUDENT_MODEL": "student"}
    with pytest.raises(ConfigError, match="eos_token id"):
        build_local_backends(load_settings(env))
