"""Behaviour of the embedded demo assets, checked on the fast untrained build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mopd.demo import (
    ARITHMETIC_ROUTE,
    MATH_ROUTE,
    ROUTES,
    DemoAssets,
    build_untrained,
    default_cache_dir,
    ensure_demo,
    extract_final_answer,
    greedy_accuracy,
    is_correct,
    load_demo,
)
from mopd.demo.tasks import Problem, all_problems, read_jsonl, split_problems


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    return build_untrained(tmp_path_factory.mktemp("demo"))


def _user_messages(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def test_tokenizer_loads_with_auto_tokenizer(assets: DemoAssets) -> None:
    tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer_dir)

    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.bos_token_id not in (tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert len(tokenizer) == 260


def test_template_has_one_bos(assets: DemoAssets) -> None:
    tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    text = tokenizer.apply_chat_template(
        _user_messages("Solve 18 + 24. End with Final: <answer>."), add_generation_prompt=True, tokenize=False
    )

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    assert text.startswith(tokenizer.bos_token)
    assert text.endswith("<|im_start|>assistant\n")
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1


def test_encoding_template_with_special_tokens_doubles_bos(assets: DemoAssets) -> None:
    tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    text = tokenizer.apply_chat_template(_user_messages("hi"), add_generation_prompt=True, tokenize=False)

    ids = tokenizer(text, add_special_tokens=True)["input_ids"]

    assert ids[:2] == [tokenizer.bos_token_id, tokenizer.bos_token_id]


def test_template_renders_chatml_turns(assets: DemoAssets) -> None:
    tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Solve 2 * 10."},
        {"role": "assistant", "content": "Final: 20"},
    ]

    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)

    assert text == (
        "<|bos|><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nSolve 2 * 10.<|im_end|>\n"
        "<|im_start|>assistant\nFinal: 20<|im_end|>\n"
    )


@pytest.mark.parametrize(
    "text",
    [
        "Natalia sold clips to 48 of her friends in April, and then half as many in May.",
        "Weng earns $12 an hour for babysitting.\nYesterday she did 50 minutes.\tHow much?",
        "Café crème costs 3,50 € — 日本語のテキスト 🙂 ½ ∑",
    ],
)
def test_text_round_trips_through_tokenizer(assets: DemoAssets, text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer_dir)

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    assert len(ids) == len(text.encode("utf-8"))
    assert max(ids) < 256
    assert tokenizer.decode(ids) == text


def test_completion_ends_with_eos_id(assets: DemoAssets) -> None:
    tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer_dir)

    ids = tokenizer("Final: 42<|im_end|>", add_special_tokens=False)["input_ids"]

    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Final: 42"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Final: 42", "42"),
        ("18 + 24 = 42\nFinal: 42", "42"),
        ("Final: 1\nFinal: 2", "2"),
        ("Final: 42\n\n  \n", "42"),
        ("   Final:    42   ", "42"),
        ("Final: 42.", "42"),
        ("Final: 42\nI am not sure.", None),
        ("The answer is 42", None),
        ("Final:", None),
        ("", None),
        ("\n\n", None),
    ],
)
def test_extract_final_answer_reads_last_non_empty_line(text: str, expected: str | None) -> None:
    assert extract_final_answer(text) == expected


def test_is_correct_compares_final_answer() -> None:
    assert is_correct("Final: 42", "42")
    assert is_correct("Final: 1,000", "1000")
    assert not is_correct("Final: 41", "42")
    assert not is_correct("42", "42")


def test_problems_match_their_questions() -> None:
    assert Problem(ARITHMETIC_ROUTE, 18, 24).question == "Solve 18 + 24. End with Final: <answer>."
    assert Problem(ARITHMETIC_ROUTE, 18, 24).completion == "Final: 42"
    assert Problem(MATH_ROUTE, 347, 2).question == "Solve 347 * 2. End with Final: <answer>."
    assert Problem(MATH_ROUTE, 347, 2).answer == "694"
    with pytest.raises(ValueError, match="invalid demo route"):
        all_problems(route="no-such-teacher")


def test_dataset_rows_have_required_fields(assets: DemoAssets) -> None:
    for path in (assets.train_path, assets.heldout_path):
        rows = read_jsonl(path)
        assert rows
        for row in rows:
            assert set(row) == {"messages", "teacher", "expected_answer"}
            assert row["teacher"] in ROUTES
            assert row["messages"][0]["role"] == "user"
            assert isinstance(row["expected_answer"], str)
            assert is_correct(f"Final: {row['expected_answer']}", row["expected_answer"])


def test_training_file_interleaves_both_routes(assets: DemoAssets) -> None:
    routes = [row["teacher"] for row in read_jsonl(assets.train_path)]

    assert len(routes) >= 2000
    assert {route: routes.count(route) for route in ROUTES} == {route: len(routes) // 2 for route in ROUTES}
    # A seeded shuffle, not one route's block after the other's.
    assert set(routes[:50]) == set(ROUTES)


def test_heldout_problems_not_in_training(assets: DemoAssets) -> None:
    train = {json.dumps(row["messages"]) for row in read_jsonl(assets.train_path)}
    heldout_rows = read_jsonl(assets.heldout_path)

    assert {route: sum(row["teacher"] == route for row in heldout_rows) for route in ROUTES} == {
        ARITHMETIC_ROUTE: 100, MATH_ROUTE: 100,
    }
    assert not {json.dumps(row["messages"]) for row in heldout_rows} & train


def test_split_rejects_oversized_heldout() -> None:
    with pytest.raises(ValueError, match=r"heldout_count must be between 1 and 225 for route 'math-teacher'"):
        split_problems(route=MATH_ROUTE, heldout_count=300, seed=1)


def test_data_files_are_deterministic(assets: DemoAssets, tmp_path: Path) -> None:
    again = build_untrained(tmp_path / "again")

    assert again.train_path.read_bytes() == assets.train_path.read_bytes()
    assert again.heldout_path.read_bytes() == assets.heldout_path.read_bytes()


def test_models_load_with_auto_model(assets: DemoAssets) -> None:
    tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    for directory in (assets.student_dir, *assets.teacher_dirs.values()):
        assert (directory / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(directory)
        assert model.config.vocab_size == len(tokenizer)
        assert model.generation_config.eos_token_id == tokenizer.eos_token_id
        assert model.generation_config.pad_token_id == tokenizer.pad_token_id
        # Each model directory carries its own tokenizer files.
        assert AutoTokenizer.from_pretrained(directory).eos_token_id == tokenizer.eos_token_id


def test_teacher_dirs_cover_both_routes(assets: DemoAssets) -> None:
    assert set(assets.teacher_dirs) == {ARITHMETIC_ROUTE, MATH_ROUTE}
    assert assets.manifest["trained"] is False
    assert load_demo(assets.root).manifest == assets.manifest


def test_greedy_accuracy_runs_batched_generation(assets: DemoAssets) -> None:
    tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(assets.student_dir)
    rows = read_jsonl(assets.heldout_path)[:5]

    accuracy = greedy_accuracy(model, tokenizer, rows, max_new_tokens=4, batch_size=2)

    assert 0.0 <= accuracy <= 1.0
    assert greedy_accuracy(model, tokenizer, [], max_new_tokens=4) == 0.0


def test_left_padded_batch_matches_single_prompt_logits(assets: DemoAssets) -> None:
    tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(assets.student_dir)
    short = tokenizer("<|bos|>ab", add_special_tokens=False)["input_ids"]
    long = tokenizer("<|bos|>abcdef", add_special_tokens=False)["input_ids"]
    padded = [tokenizer.pad_token_id] * (len(long) - len(short)) + short
    input_ids = torch.tensor([padded, long])
    attention_mask = torch.tensor([[0] * (len(long) - len(short)) + [1] * len(short), [1] * len(long)])
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

    with torch.inference_mode():
        batched = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        single = model(input_ids=torch.tensor([short])).logits

    torch.testing.assert_close(batched[0, -1], single[0, -1], atol=1e-4, rtol=1e-4)


def test_ensure_demo_reuses_a_finished_directory(assets: DemoAssets, tmp_path: Path) -> None:
    # A finished trained build is recognised by its manifest alone.
    root = tmp_path / "cache"
    root.mkdir()
    manifest = dict(assets.manifest, trained=True)
    (root / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")

    reused = ensure_demo(root)

    assert reused.root == root
    assert reused.manifest == manifest
    assert reused.teacher_dirs[MATH_ROUTE] == root / "teachers" / MATH_ROUTE


def test_default_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOPD_DEMO_DIR", str(tmp_path / "demo"))
    assert default_cache_dir() == tmp_path / "demo"

    monkeypatch.delenv("MOPD_DEMO_DIR")
    assert default_cache_dir().parent == Path.home() / ".cache" / "mopd"
