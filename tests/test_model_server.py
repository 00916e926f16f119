"""mopd model-server in process: the vLLM-compatible subset, driven by the openai backend's own clients."""

from __future__ import annotations

import math
from pathlib import Path

import anyio
import httpx
import pytest
import torch

from mopd.backends.base import SamplingParams
from mopd.backends.openai.client import Deployment, RetryPolicy, Timeouts
from mopd.backends.openai.dialects import Wire
from mopd.backends.openai.sampler import OpenAISampler, OpenAIScorer
from mopd.backends.openai.weights import ServerWeightSync
from mopd.backends.local.models import load_causal_lm
from mopd.modelserver.server import ModelService, build_app

PROMPT = (0, 72, 105, 33, 10)
URL = "http://model-server"


@pytest.fixture
def service(tiny_models: Path):
    service = ModelService(model_dir=tiny_models / "student", served_name="student", device=torch.device("cpu"),
                           batch_wait_seconds=0.01)
    yield service
    service.close()


def deployment_for(service: ModelService) -> Deployment:
    return Deployment(name="student", base_urls=[URL], api_key=None, timeouts=Timeouts(read=60.0),
                      retry=RetryPolicy(max_retries=0), max_connections=16,
                      transport=httpx.ASGITransport(app=build_app(service)))


@pytest.mark.parametrize("score_mode", ["prompt_logprobs", "echo"])
async def test_scores_match_sampling_logprobs(service: ModelService, score_mode: str) -> None:
    deployment = deployment_for(service)
    wire = Wire(dialect="vllm", score_mode=score_mode)
    sampler = OpenAISampler(deployment=deployment, wire=wire, model="student")
    scorer = OpenAIScorer(name="self", deployment=deployment, wire=wire, model="student")

    samples = await sampler.sample(PROMPT, SamplingParams(n=3, max_tokens=6, temperature=1.0))
    scored = await scorer.score(PROMPT, [s.completion_ids_T for s in samples])
    await deployment.aclose()

    # The same weights sampled and scored the same ids, so the logprobs agree.
    for sample, score in zip(samples, scored, strict=True):
        assert score.failure is None
        assert len(sample.completion_ids_T) == len(sample.sampling_logprobs_T) == len(score.logprobs_T)
        for sampled, teacher in zip(sample.sampling_logprobs_T, score.logprobs_T, strict=True):
            assert math.isclose(sampled, teacher, abs_tol=1e-3)


async def test_concurrent_requests_are_batched(service: ModelService) -> None:
    deployment = deployment_for(service)
    sampler = OpenAISampler(deployment=deployment, wire=Wire(), model="student")
    batches: list[int] = []
    original = service._sample_batch

    def counting(payloads):
        batches.append(len(payloads))
        return original(payloads)

    service._sample_batch = counting  # type: ignore[method-assign]
    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(sampler.sample, PROMPT, SamplingParams(n=1, max_tokens=3))
    await deployment.aclose()

    assert sum(batches) == 6
    assert max(batches) > 1


async def test_unknown_model_and_bad_prompt(service: ModelService) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(service)), base_url=URL) as client:
        wrong = await client.post("/v1/completions", json={"model": "other", "prompt": [1, 2], "max_tokens": 1})
        text = await client.post("/v1/completions", json={"model": "student", "prompt": "hi", "max_tokens": 1})
        zero = await client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 0})
        long = await client.post("/v1/completions", json={"prompt": [1] * 1020, "max_tokens": 10})

    assert wrong.status_code == 404
    assert "other" in wrong.json()["message"]
    assert text.status_code == 400
    assert zero.status_code == 400
    assert long.status_code == 400
    assert "context window" in long.json()["message"]


async def test_weight_sync_loads_new_weights(service: ModelService, tiny_models: Path, tmp_path: Path) -> None:
    deployment = deployment_for(service)
    sampler = OpenAISampler(deployment=deployment, wire=Wire(), model="student")
    sync = ServerWeightSync(deployment=deployment, sampler=sampler, mode="lora", local_dir=tmp_path, server_dir=None)
    teacher = load_causal_lm(tiny_models / "math-teacher", device=torch.device("cpu"))

    async def save(directory: Path) -> None:
        teacher.save_pretrained(str(directory))

    await sync.publish(version=1, save=save)
    samples = await sampler.sample(PROMPT, SamplingParams(n=1, max_tokens=2))

    assert service.served_name == sampler.current_model
    assert samples[0].policy_version == 1
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(service.model.state_dict()[name], tensor)

    # The replaced name is gone, as the server keeps one set of weights.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(service)), base_url=URL) as client:
        stale = await client.post("/v1/completions", json={"model": "student", "prompt": [1, 2], "max_tokens": 1})
        missing = await client.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "nope")})
    assert stale.status_code == 404
    assert missing.json()["success"] is False
    await deployment.aclose()


async def test_lora_adapter_is_merged_onto_the_starting_weights(
    service: ModelService, tiny_models: Path, tmp_path: Path
) -> None:
    from mopd.backends.local.lora import LoraSpec, merged_state_dict, save_lora_weights, wrap_lora

    # 1. A peft adapter with non-zero B matrices, as the local LoRA trainer publishes it.
    starting = load_causal_lm(tiny_models / "student", device=torch.device("cpu")).state_dict()
    base = load_causal_lm(tiny_models / "student", device=torch.device("cpu"))
    peft_model = wrap_lora(base, LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj")), seed=3)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    expected = merged_state_dict(peft_model.get_base_model())

    # 2. Publish it twice: each load applies to the starting weights, not to the previous adapter.
    deployment = deployment_for(service)
    sampler = OpenAISampler(deployment=deployment, wire=Wire(), model="student")
    sync = ServerWeightSync(deployment=deployment, sampler=sampler, mode="lora", local_dir=tmp_path, server_dir=None)

    async def save(directory: Path) -> None:
        save_lora_weights(peft_model, directory, publish="adapter")

    for version in (1, 2):
        await sync.publish(version=version, save=save)
        assert (tmp_path / f"v{version:06d}" / "adapter_config.json").is_file()
        served = service.model.state_dict()
        for name, tensor in expected.items():
            assert torch.allclose(served[name], tensor, atol=1e-6), name
    assert service.served_name == sampler.current_model
    query = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(expected[query], starting[query])

    # 3. An adapter that names a module the model lacks is refused with a reason.
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(service)), base_url=URL) as client:
        empty = await client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path)})
    assert empty.status_code == 400
    assert "adapter_config.json" in empty.text
    await deployment.aclose()


async def test_metrics_use_vllm_names(service: ModelService) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(service)), base_url=URL) as client:
        await client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
        health = await client.get("/health")
        metrics = (await client.get("/metrics")).text

    assert health.status_code == 200
    assert 'vllm:num_requests_waiting{model_name="student"}' in metrics
    assert 'vllm:num_requests_running{model_name="student"}' in metrics
    assert 'vllm:e2e_request_latency_seconds_count{model_name="student"} 1.0' in metrics
    assert 'vllm:request_success_total{model_name="student"} 1.0' in metrics
