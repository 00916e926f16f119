"""Shared fixtures: a clean environment and small real models built locally."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ENV_PREFIXES = ("MOPD_", "DISTILLATION_", "OPD_", "TINKER_")
DATA = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings must come only from what a test sets."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIXES):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random-init tokenizer, student and two teachers (real transformers
    directories) with a context long enough for GSM8K prompts."""
    from mopd.demo.models import ModelShape, build_model, save_model
    from mopd.demo.tokenizer import save_tokenizer

    root = tmp_path_factory.mktemp("models")
    tokenizer = save_tokenizer(directory=root / "tokenizer")
    shape = ModelShape(hidden_size=64, intermediate_size=128, max_position_embeddings=1024)
    for seed, name in enumerate(("student", "arithmetic-teacher", "math-teacher")):
        model = build_model(tokenizer=tokenizer, shape=shape, seed=seed)
        save_model(model=model, tokenizer=tokenizer, directory=root / name)
    return root


@pytest.fixture(scope="session")
def gsm8k_routed() -> Path:
    """200 real GSM8K problems in the routed row format."""
    return DATA / "gsm8k_routed.jsonl"


@pytest.fixture
def executor():
    """A device executor for local-backend tests, closed and joined afterwards."""
    from mopd.backends.local.executor import DeviceExecutor

    executor = DeviceExecutor(max_batch_size=64, batch_wait_seconds=0.01)
    yield executor
    executor.close()
    executor.join(5)
