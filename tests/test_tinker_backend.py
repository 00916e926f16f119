"""Tinker backend against a respx-mocked Tinker service: every request body is checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import respx

from mopd.backends.base import SamplingParams
from mopd.backends.tinker import TinkerBackends, build_tinker_backends
from mopd.errors import ConfigError
from mopd.pipeline.advantages import make_datum
from mopd.settings import load_settings
from tinker_fake import BASE_URL, LOSS_SUM, PROMPT_LOGPROB, SAMPLE_LOGPROB, FakeTinker

pytest.importorskip("tinker")


def _env(tiny_models: Path, **extra: str) -> dict[str, str]:
    env = {
        "MOPD_BACKEND": "tinker",
        "TINKER_API_KEY": "tml-test-key",
        "MOPD_TINKER_BASE_URL": BASE_URL,
        "MOPD_STUDENT_MODEL": "student-base",
        "MOPD_STUDENT_MODEL_DIR": str(tiny_models / "student"),
        "MOPD_TEACHERS": '[{"model": "teacher-base", "route": "math"}, '
                         '{"model": "tinker://teacher-run/sampler_weights/final", "route": "arith"}]',
        "MOPD_DATA_PATH": "rows.jsonl",
        "MOPD_LEARNING_RATE": "0.002",
        "MOPD_MAX_GRAD_NORM": "0.5",
        "MOPD_TINKER_LORA_RANK": "8",
    }
    env.update(extra)
    return env


@pytest.fixture
def fake() -> FakeTinker:
    service = FakeTinker()
    with respx.mock(assert_all_called=False, assert_all_mocked=True) as router:
        router.route(host="tinker.test").mock(side_effect=service.handle)
        yield service


async def _build(tiny_models: Path) -> TinkerBackends:
    import anyio

    return await anyio.to_thread.run_sync(build_tinker_backends, load_settings(_env(tiny_models)))


def _floats(tensor) -> list[float]:
    return np.frombuffer(tensor.dense, dtype=np.float32).tolist()


def _ints(tensor) -> list[int]:
    return np.frombuffer(tensor.dense, dtype=np.int64).tolist()


async def test_full_cycle_sends_expected_bodies(tiny_models: Path, fake: FakeTinker) -> None:
    backends = await _build(tiny_models)
    try:
        # 1. Start-up: a LoRA student of the base model, and one sampler per teacher and for the student.
        create_model = fake.bodies("/api/v1/create_model")[0]
        assert create_model["base_model"] == "student-base"
        assert create_model["lora_config"]["rank"] == 8
        sessions = fake.bodies("/api/v1/create_sampling_session")
        assert {"base_model": "student-base"}.items() <= sessions[0].items()
        assert sessions[1]["base_model"] == "teacher-base"
        assert sessions[2]["model_path"] == "tinker://teacher-run/sampler_weights/final"
        assert sorted(backends.scorers) == ["arith", "math"]

        # 2. Sample from the student: ids in, ids and logprobs out, stamped with version 0.
        samples = await backends.sampler.sample([5, 6, 7], SamplingParams(n=2, max_tokens=3, temperature=1.0))
        asample = fake.bodies("/api/v1/asample")[-1]
        assert asample["num_samples"] == 2
        assert asample["prompt"]["chunks"][0]["tokens"] == [5, 6, 7]
        assert asample["sampling_params"]["max_tokens"] == 3
        assert asample["sampling_params"]["stop"] == [backends.renderer.eos_token_id]
        assert asample["sampling_session_id"] == list(fake.sampling_sessions)[0]
        assert [s.completion_ids_T for s in samples] == [(8, 9, 10), (8, 9, 10)]
        assert samples[0].sampling_logprobs_T == (SAMPLE_LOGPROB,) * 3
        assert samples[0].finish_reason == "length"
        assert samples[0].policy_version == 0

        # 3. Score with compute_logprobs: prompt + completion, only the completion scored.
        scored = await backends.scorers["math"].score([5, 6, 7], [samples[0].completion_ids_T])
        score_request = fake.bodies("/api/v1/asample")[-1]
        assert score_request["prompt"]["chunks"][0]["tokens"] == [5, 6, 7, 8, 9, 10]
        assert score_request["prompt_logprobs"] is True
        assert score_request["prompt_logprobs_last_n"] == 3
        assert score_request["sampling_session_id"] == list(fake.sampling_sessions)[1]
        assert scored[0].logprobs_T == (PROMPT_LOGPROB,) * 3
        assert scored[0].failure is None

        # 4. Train one step: forward_backward with importance_sampling, then optim_step.
        datum = make_datum(prompt_ids_T=[5, 6, 7], completion_ids_T=samples[0].completion_ids_T,
                           sampling_logprobs_T=samples[0].sampling_logprobs_T,
                           teacher_logprobs_T=scored[0].logprobs_T, loss_scale=1.0)
        result = await backends.trainer.train_step([datum], "importance_sampling")
        backward = fake.bodies("/api/v1/forward_backward")[0]
        assert backward.loss_fn == "importance_sampling"
        assert backward.model_id == "model-1"
        sent = backward.data[0]
        assert np.frombuffer(sent.model_input[0].encoded_text.tokens, dtype=np.int32).tolist() == [5, 6, 7, 8, 9]
        assert _ints(sent.loss_fn_inputs["target_tokens"]) == [6, 7, 8, 9, 10]
        assert _floats(sent.loss_fn_inputs["logprobs"]) == [0.0, 0.0, SAMPLE_LOGPROB, SAMPLE_LOGPROB, SAMPLE_LOGPROB]
        advantage = PROMPT_LOGPROB - SAMPLE_LOGPROB
        assert _floats(sent.loss_fn_inputs["advantages"]) == [0.0, 0.0, advantage, advantage, advantage]
        optim = fake.bodies("/api/v1/optim_step")[0]
        assert optim["adam_params"]["learning_rate"] == pytest.approx(0.002)
        assert optim["adam_params"]["grad_clip_norm"] == pytest.approx(0.5)
        assert result.loss == pytest.approx(LOSS_SUM / 3)
        assert result.grad_norm == pytest.approx(0.75)
        assert result.tokens == 3
        assert result.policy_version == 1

        # 5. Publish: save_weights_for_sampler, then a fresh sampling session over the saved path.
        saved = fake.bodies("/api/v1/save_weights_for_sampler")[0]
        assert saved["model_id"] == "model-1"
        assert saved["path"].endswith("-v000001")
        assert fake.bodies("/api/v1/create_sampling_session")[-1]["model_path"] == fake.saved_paths[-1]
        assert backends.sampler.policy_version == 1
        later = await backends.sampler.sample([5, 6, 7], SamplingParams(n=1, max_tokens=2))
        assert later[0].policy_version == 1
        assert fake.bodies("/api/v1/asample")[-1]["sampling_session_id"] == list(fake.sampling_sessions)[-1]

        # 6. The calls came in cycle order.
        work = [p for p in fake.paths() if p in {
            "/api/v1/forward_backward", "/api/v1/optim_step", "/api/v1/save_weights_for_sampler",
            "/api/v1/create_sampling_session"}]
        assert work[-4:] == ["/api/v1/forward_backward", "/api/v1/optim_step",
                             "/api/v1/save_weights_for_sampler", "/api/v1/create_sampling_session"]
    finally:
        await backends.aclose()


async def test_scorer_returns_topk_candidates(tiny_models: Path, fake: FakeTinker) -> None:
    backends = await _build(tiny_models)
    try:
        scored = await backends.scorers["math"].score([5, 6], [(7, 8)], top_k=3)
        request = fake.bodies("/api/v1/asample")[-1]
        assert request["topk_prompt_logprobs"] == 3
        assert request["prompt_logprobs_last_n"] == 2
        assert scored[0].topk_ids_TK is not None
        assert len(scored[0].topk_ids_TK) == 2
        assert all(len(row) == 3 for row in scored[0].topk_ids_TK)
    finally:
        await backends.aclose()


async def test_first_none_logprob_is_never_an_advantage(tiny_models: Path, fake: FakeTinker) -> None:
    backends = await _build(tiny_models)
    try:
        # compute_logprobs returns None for the first prompt token; a server that also leaves a
        # completion position unscored must not turn into an advantage.
        fake.unscored_prefix = 2
        scored = await backends.scorers["math"].score([5], [(6, 7)])
        assert scored[0].logprobs_T is not None
        assert np.isnan(scored[0].logprobs_T[0])
    finally:
        await backends.aclose()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        pytest.param({"TINKER_API_KEY": ""}, "TINKER_API_KEY", id="no-key"),
        pytest.param({"MOPD_STUDENT_MODEL_DIR": ""}, "MOPD_STUDENT_MODEL_DIR", id="no-tokenizer"),
        pytest.param({"MOPD_TEMPERATURE": "0.7"}, "MOPD_TEMPERATURE", id="temperature"),
    ],
)
def test_invalid_settings_stop_start_up(tiny_models: Path, change: dict[str, str], message: str) -> None:
    env = _env(tiny_models, **change)
    env = {k: v for k, v in env.items() if v}
    with pytest.raises(ConfigError, match=message):
        build_tinker_backends(load_settings(env))


async def test_state_round_trips_through_service(tiny_models: Path, fake: FakeTinker, tmp_path: Path) -> None:
    backends = await _build(tiny_models)
    try:
        datum = make_datum(prompt_ids_T=[5, 6], completion_ids_T=[7], sampling_logprobs_T=[-1.0],
                           teacher_logprobs_T=[-0.5], loss_scale=1.0)
        await backends.trainer.train_step([datum], "importance_sampling")
        await backends.trainer.save_state(tmp_path / "trainer.json")
        saved = fake.bodies("/api/v1/save_weights")[0]
        assert saved["model_id"] == "model-1"

        await backends.trainer.load_state(tmp_path / "trainer.json")
        loaded = fake.bodies("/api/v1/load_weights")[-1]
        assert loaded["path"] == fake.saved_paths[-2]
        assert loaded["optimizer"] is True
        assert backends.trainer.policy_version == 1
        assert fake.bodies("/api/v1/create_sampling_session")[-1]["model_path"] == fake.saved_paths[-1]
    finally:
        await backends.aclose()


@pytest.mark.slow
async def test_service_run_trains_on_tinker(tiny_models: Path, fake: FakeTinker, gsm8k_routed: Path,
                                            tmp_path: Path) -> None:
    import anyio

    from mopd.app import run
    from mopd.metrics import Metrics

    env = _env(tiny_models, MOPD_DATA_PATH=str(gsm8k_routed), MOPD_STATE_DIR=str(tmp_path / "state"),
               MOPD_TEACHERS='[{"model": "math-base", "route": "math-teacher"}, '
                             '{"model": "arith-base", "route": "arithmetic-teacher"}]',
               MOPD_MAX_TOKENS="3", MOPD_COMPLETIONS_PER_PROMPT="2", MOPD_PROMPT_GROUPS_PER_STEP="4",
               MOPD_MAX_STEPS="2", MOPD_METRICS_ENABLED="false")
    with anyio.fail_after(120):
        outcome = await run(load_settings(env), metrics=Metrics(), stop=anyio.Event())

    assert outcome.summary["steps"] == 2
    assert outcome.summary["policy_version"] == 2
    assert len(fake.bodies("/api/v1/forward_backward")) == 2
    assert len(fake.bodies("/api/v1/save_weights_for_sampler")) >= 2
    # Every trained datum reached Tinker with advantage 0 on its prompt positions.
    for request in fake.bodies("/api/v1/forward_backward"):
        for datum in request.data:
            advantages = _floats(datum.loss_fn_inputs["advantages"])
            assert advantages[0] == 0.0
            assert advantages[-1] == pytest.approx(PROMPT_LOGPROB - SAMPLE_LOGPROB)
