"""openai backend: request bodies, response shapes of each dialect, and faults, against respx routes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import anyio
import httpx
import pytest
import respx
import structlog
from pydantic import SecretStr

from mopd.backends.base import SamplingParams
from mopd.backends.openai import check_openai_settings
from mopd.backends.openai.client import Deployment, RetryPolicy, Timeouts
from mopd.backends.openai.dialects import Wire
from mopd.backends.openai.sampler import OpenAISampler, OpenAIScorer
from mopd.backends.openai.weights import ServerWeightSync
from mopd.errors import BackendError, ConfigError
from mopd.pipeline.advantages import check_sample
from mopd.settings import load_settings

URL = "http://127.0.0.1:8000"
PROMPT = (1, 10, 11)
COMPLETION = (20, 21, 2)
PARAMS = SamplingParams(n=2, max_tokens=3, temperature=1.0)
VLLM = Wire(dialect="vllm", score_mode="prompt_logprobs", token_ids_mode="return_token_ids")


class Sleeps:
    """Records backoff waits instead of sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(seconds)


def deployment(sleeps: Sleeps | None = None, *, urls: tuple[str, ...] = (URL,), retries: int = 3,
               api_key: str | None = None) -> Deployment:
    return Deployment(
        name="test", base_urls=urls, api_key=SecretStr(api_key) if api_key else None,
        timeouts=Timeouts(connect=1.0, read=1.0, pool=1.0),
        retry=RetryPolicy(max_retries=retries, base_seconds=0.1, max_seconds=5.0), max_connections=8,
        sleep=sleeps or Sleeps(),
    )


def body_of(route: respx.Route, call: int = -1) -> dict:
    return json.loads(route.calls[call].request.content)


def vllm_choice(index: int, ids: list[int], lps: list[float | None] | None, finish: str = "stop") -> dict:
    choice = {"index": index, "text": "", "finish_reason": finish, "token_ids": ids, "prompt_token_ids": list(PROMPT)}
    choice["logprobs"] = None if lps is None else {"tokens": [f"token_id:{i}" for i in ids], "token_logprobs": lps}
    return choice


def prompt_logprobs_body(sequence: list[int], values: list[float | None], echoed: list[int] | None = None) -> dict:
    entries: list[dict | None] = [None]
    for token, value in zip(sequence[1:], values[1:], strict=True):
        entries.append({str(token): {"logprob": value, "rank": 1, "decoded_token": "x"}})
    return {"choices": [{"index": 0, "text": "", "finish_reason": "length", "prompt_logprobs": entries,
                         "prompt_token_ids": echoed if echoed is not None else sequence, "token_ids": [5]}]}


# --- sampling ------------------------------------------------------------------


@respx.mock
async def test_vllm_sample_request_body() -> None:
    route = respx.post(f"{URL}/v1/completions").respond(json={"choices": [
        vllm_choice(1, [22, 2], [-0.5, -0.1]), vllm_choice(0, [20, 21, 2], [-1.0, -2.0, -0.2], "stop"),
    ]})
    sampler = OpenAISampler(deployment=deployment(), wire=VLLM, model="student")
    params = SamplingParams(n=2, max_tokens=3, temperature=0.7, stop_token_ids=(9,), seed=5)

    samples = await sampler.sample(PROMPT, params)

    body = body_of(route)
    assert body["model"] == "student"
    assert body["prompt"] == [1, 10, 11]
    assert body["n"] == 2
    assert body["max_tokens"] == 3
    assert body["temperature"] == 0.7
    assert body["logprobs"] == 1
    assert body["return_token_ids"] is True
    assert body["stop_token_ids"] == [9]
    assert body["seed"] == 5
    assert "echo" not in body
    # Choices come back ordered by index.
    assert samples[0].completion_ids_T == (20, 21, 2)
    assert samples[0].sampling_logprobs_T == (-1.0, -2.0, -0.2)
    assert samples[1].completion_ids_T == (22, 2)
    assert all(s.policy_version == 0 for s in samples)


@respx.mock
async def test_vllm_tokens_as_token_ids() -> None:
    route = respx.post(f"{URL}/v1/completions").respond(json={"choices": [
        {"index": 0, "finish_reason": "length", "logprobs": {"tokens": ["token_id:7", "token_id:8"],
                                                               "token_logprobs": [-1.0, -2.0]}},
    ]})
    wire = Wire(dialect="vllm", score_mode="prompt_logprobs", token_ids_mode="tokens_as_token_ids")
    sampler = OpenAISampler(deployment=deployment(), wire=wire, model="student")

    samples = await sampler.sample(PROMPT, SamplingParams(n=1, max_tokens=2))

    assert body_of(route)["return_tokens_as_token_ids"] is True
    assert "return_token_ids" not in body_of(route)
    assert samples[0].completion_ids_T == (7, 8)
    assert samples[0].finish_reason == "length"


@respx.mock
async def test_sample_without_token_ids_fails_group() -> None:
    respx.post(f"{URL}/v1/completions").respond(json={"choices": [
        {"index": 0, "finish_reason": "stop", "logprobs": {"tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0]}},
    ]})
    sampler = OpenAISampler(deployment=deployment(), wire=VLLM, model="student")

    with pytest.raises(BackendError) as info:
        await sampler.sample(PROMPT, SamplingParams(n=1, max_tokens=2))
    assert info.value.reason == "missing_token_ids"


@respx.mock
async def test_fireworks_sample_reads_raw_output_and_queue_header() -> None:
    route = respx.post(f"{URL}/v1/completions").respond(
        json={"choices": [{"index": 0, "finish_reason": "length",
                           "raw_output": {"prompt_token_ids": list(PROMPT), "completion_token_ids": [30, 31]},
                           "logprobs": {"tokens": ["a", "b"], "token_logprobs": [-0.3, -0.4]}}]},
        headers={"prefill-queue-duration": "0.25"},
    )
    wire = Wire(dialect="fireworks", score_mode="echo")
    sampler = OpenAISampler(deployment=deployment(), wire=wire, model="accounts/x/models/student")

    samples = await sampler.sample(PROMPT, SamplingParams(n=1, max_tokens=2))

    body = body_of(route)
    assert body["raw_output"] is True
    assert "return_token_ids" not in body
    assert samples[0].completion_ids_T == (30, 31)
    assert samples[0].finish_reason == "length"
    assert sampler.last_queue_seconds == {"prefill-queue-duration": 0.25}


@respx.mock
async def test_sglang_sample_uses_native_generate() -> None:
    item = {"text": "", "output_ids": [40, 2],
            "meta_info": {"output_token_logprobs": [[-0.2, 40, None], [-0.1, 2, None]],
                          "finish_reason": {"type": "stop", "matched": 2}}}
    route = respx.post(f"{URL}/generate").respond(json=[item, item])
    sampler = OpenAISampler(deployment=deployment(), wire=Wire(dialect="sglang", score_mode="generate"), model="s")

    samples = await sampler.sample(PROMPT, PARAMS)

    body = body_of(route)
    assert body["input_ids"] == [list(PROMPT), list(PROMPT)]
    assert body["sampling_params"] == {"temperature": 1.0, "max_new_tokens": 3}
    assert body["return_logprob"] is True
    assert "lora_path" not in body
    assert [s.completion_ids_T for s in samples] == [(40, 2), (40, 2)]
    assert samples[0].sampling_logprobs_T == (-0.2, -0.1)
    assert samples[0].finish_reason == "stop"


@respx.mock
async def test_missing_sample_logprobs_reject_that_sample() -> None:
    respx.post(f"{URL}/v1/completions").respond(json={"choices": [
        vllm_choice(0, [20, 2], None), vllm_choice(1, [21, 2], [-1.0, -0.5]),
    ]})
    sampler = OpenAISampler(deployment=deployment(), wire=VLLM, model="student")

    samples = await sampler.sample(PROMPT, PARAMS)

    assert all(math.isnan(v) for v in samples[0].sampling_logprobs_T)
    reasons = [check_sample(completion_ids_T=s.completion_ids_T, sampling_logprobs_T=s.sampling_logprobs_T,
                            teacher_logprobs_T=(-1.0, -1.0), echoed_ids_T=None, failure=None,
                            finish_reason=s.finish_reason, truncated_policy="train") for s in samples]
    assert reasons == ["nonfinite_logprob", None]


@respx.mock
async def test_short_sample_logprobs_reject_that_sample() -> None:
    respx.post(f"{URL}/v1/completions").respond(json={"choices": [
        vllm_choice(0, [20, 21, 2], [-1.0, -0.5]), vllm_choice(1, [21, 2], [-1.0, -0.5]),
    ]})
    sampler = OpenAISampler(deployment=deployment(), wire=VLLM, model="student")

    samples = await sampler.sample(PROMPT, PARAMS)

    reason = check_sample(completion_ids_T=samples[0].completion_ids_T,
                          sampling_logprobs_T=samples[0].sampling_logprobs_T, teacher_logprobs_T=(-1.0,) * 3,
                          echoed_ids_T=None, failure=None, finish_reason="stop", truncated_policy="train")
    assert reason == "length_mismatch"


@respx.mock
async def test_length_finish_and_empty_completion() -> None:
    respx.post(f"{URL}/v1/completions").respond(json={"choices": [
        vllm_choice(0, [20, 21, 22], [-1.0, -0.5, -0.1], "length"), vllm_choice(1, [], [], "stop"),
    ]})
    sampler = OpenAISampler(deployment=deployment(), wire=VLLM, model="student")

    samples = await sampler.sample(PROMPT, PARAMS)

    assert samples[0].finish_reason == "length"
    assert samples[1].completion_ids_T == ()
    assert check_sample(completion_ids_T=(), sampling_logprobs_T=(), teacher_logprobs_T=(), echoed_ids_T=(),
                        failure=None, finish_reason="stop", truncated_policy="train") == "empty_completion"


@respx.mock
async def test_wrong_choice_count_fails_group() -> None:
    respx.post(f"{URL}/v1/completions").respond(json={"choices": [vllm_choice(0, [20, 2], [-1.0, -0.5])]})
    sampler = OpenAISampler(deployment=deployment(), wire=VLLM, model="student")

    with pytest.raises(BackendError) as info:
        await sampler.sample(PROMPT, PARAMS)
    assert info.value.reason == "bad_response"


# --- scoring -------------------------------------------------------------------


@respx.mock
async def test_vllm_prompt_logprobs_scoring() -> None:
    sequence = list(PROMPT + COMPLETION)
    route = respx.post(f"{URL}/v1/completions").respond(
        json=prompt_logprobs_body(sequence, [None, -1.0, -1.1, -0.3, -0.4, -0.5]))
    scorer = OpenAIScorer(name="math", deployment=deployment(), wire=VLLM, model="teacher")

    scored = await scorer.score(PROMPT, [COMPLETION])

    body = body_of(route)
    assert body["model"] == "teacher"
    assert body["prompt"] == sequence
    assert body["prompt_logprobs"] == 0
    assert body["max_tokens"] == 1
    assert body["return_token_ids"] is True
    assert "echo" not in body
    assert scored[0].failure is None
    assert scored[0].logprobs_T == (-0.3, -0.4, -0.5)
    assert scored[0].echoed_ids_T == COMPLETION


@respx.mock
async def test_vllm_echo_scoring() -> None:
    sequence = list(PROMPT + COMPLETION)
    route = respx.post(f"{URL}/v1/completions").respond(json={"choices": [{
        "index": 0, "finish_reason": "length",
        "logprobs": {"tokens": [f"token_id:{t}" for t in sequence],
                     "token_logprobs": [None, -1.0, -1.1, -0.3, -0.4, -0.5]},
    }]})
    scorer = OpenAIScorer(name="math", deployment=deployment(), wire=Wire(dialect="vllm", score_mode="echo"),
                          model="teacher")

    scored = await scorer.score(PROMPT, [COMPLETION])

    body = body_of(route)
    assert body["echo"] is True
    assert body["max_tokens"] == 0
    assert body["logprobs"] == 1
    assert body["return_tokens_as_token_ids"] is True
    assert scored[0].logprobs_T == (-0.3, -0.4, -0.5)


@respx.mock
async def test_sglang_echo_drops_generated_token() -> None:
    route = respx.post(f"{URL}/v1/completions").respond(json={"choices": [{
        "index": 0, "finish_reason": "length",
        "logprobs": {"tokens": ["a"] * 7, "token_logprobs": [None, -1.0, -1.1, -0.3, -0.4, -0.5, -9.0]},
    }]})
    scorer = OpenAIScorer(name="math", deployment=deployment(), wire=Wire(dialect="sglang", score_mode="echo"),
                          model="teacher")

    scored = await scorer.score(PROMPT, [COMPLETION])

    assert body_of(route)["max_tokens"] == 1
    assert scored[0].logprobs_T == (-0.3, -0.4, -0.5)


@respx.mock
async def test_sglang_generate_scoring() -> None:
    # logprob_start_len is the last prompt position: entries cover ids 11, 20, 21, 2.
    entries = [[-1.1, 11, None], [-0.3, 20, None], [-0.4, 21, None], [-0.5, 2, None]]
    route = respx.post(f"{URL}/generate").respond(json={"text": "", "meta_info": {"input_token_logprobs": entries}})
    scorer = OpenAIScorer(name="math", deployment=deployment(), wire=Wire(dialect="sglang", score_mode="generate"),
                          model="teacher")

    scored = await scorer.score(PROMPT, [COMPLETION])

    body = body_of(route)
    assert body["input_ids"] == list(PROMPT + COMPLETION)
    assert body["sampling_params"]["max_new_tokens"] == 0
    assert body["return_logprob"] is True
    assert body["logprob_start_len"] == 2
    assert scored[0].logprobs_T == (-0.3, -0.4, -0.5)


@respx.mock
async def test_fireworks_echo_scoring_checks_raw_output_ids() -> None:
    sequence = list(PROMPT + COMPLETION)
    route = respx.post(f"{URL}/v1/completions").respond(json={"choices": [{
        "index": 0, "finish_reason": "length",
        "raw_output": {"prompt_token_ids": sequence, "completion_token_ids": [7]},
        "logprobs": {"tokens": ["a"] * 7, "token_logprobs": [None, -1.0, -1.1, -0.3, -0.4, -0.5, -2.0]},
    }]})
    scorer = OpenAIScorer(name="math", deployment=deployment(), wire=Wire(dialect="fireworks", score_mode="echo"),
                          model="teacher")

    scored = await scorer.score(PROMPT, [COMPLETION])

    body = body_of(route)
    assert body["echo"] is True
    assert body["raw_output"] is True
    assert body["max_tokens"] == 1
    assert scored[0].logprobs_T == (-0.3, -0.4, -0.5)


@pytest.mark.parametrize(
    ("values", "echoed", "reason"),
    [
        pytest.param([None, -1.0, -1.1, -0.3, -0.4, -0.5], [1, 10, 11, 20, 99, 2], "echo_mismatch", id="wrong-echo"),
        pytest.param([None, -1.0, -1.1, -0.3, None, -0.5], None, "nonfinite_logprob", id="missing-logprob"),
        pytest.param([None, -1.0, -1.1, -0.3, -9999.0, -0.5], None, "clamped_logprob", id="clamped"),
        pytest.param([None, -1.0, -1.1, -0.3, float("nan"), -0.5], None, "nonfinite_logprob", id="nan"),
    ],
)
@respx.mock
async def test_scoring_alignment_failures(values: list, echoed: list | None, reason: str) -> None:
    sequence = list(PROMPT + COMPLETION)
    body = prompt_logprobs_body(sequence, values, echoed)
    respx.post(f"{URL}/v1/completions").respond(content=json.dumps(body, allow_nan=True).encode(),
                                                 headers={"content-type": "application/json"})
    scorer = OpenAIScorer(name="math", deployment=deployment(), wire=VLLM, model="teacher")

    scored = await scorer.score(PROMPT, [COMPLETION])

    assert scored[0].failure == reason
    assert scored[0].logprobs_T is None


@respx.mock
async def test_short_teacher_logprobs_are_length_mismatch() -> None:
    sequence = list(PROMPT + COMPLETION)
    body = prompt_logprobs_body(sequence[:-1], [None, -1.0, -1.1, -0.3, -0.4])
    respx.post(f"{URL}/v1/completions").respond(json=body)
    scorer = OpenAIScorer(name="math", deployment=deployment(), wire=VLLM, model="teacher")

    scored = await scorer.score(PROMPT, [COMPLETION])

    # The echoed prompt ids are short too, so the echo check fires first; without them the length check does.
    assert scored[0].failure == "echo_mismatch"
    del body["choices"][0]["prompt_token_ids"]
    respx.post(f"{URL}/v1/completions").respond(json=body)
    scored = await scorer.score(PROMPT, [COMPLETION])
    assert scored[0].failure == "length_mismatch"


@respx.mock
async def test_scorer_failure_breaks_only_its_sample() -> None:
    good = list(PROMPT + COMPLETION)

    def handler(request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["prompt"]
        if prompt == good:
            return httpx.Response(200, json=prompt_logprobs_body(good, [None, -1.0, -1.1, -0.3, -0.4, -0.5]))
        return httpx.Response(400, json={"message": "bad request"})

    respx.post(f"{URL}/v1/completions").mock(side_effect=handler)
    scorer = OpenAIScorer(name="math", deployment=deployment(), wire=VLLM, model="teacher")

    scored = await scorer.score(PROMPT, [COMPLETION, (30, 2), ()])

    assert scored[0].logprobs_T == (-0.3, -0.4, -0.5)
    assert scored[1].failure == "teacher_http_4xx"
    assert scored[2].logprobs_T == ()
    assert len(respx.calls) == 2  # the empty completion is never sent


# --- faults and retries ---------------------------------------------------------


@respx.mock
async def test_timeout_is_retried_once_per_sample_set() -> None:
    route = respx.post(f"{URL}/v1/completions").mock(side_effect=[
        httpx.ReadTimeout("read timed out"),
        httpx.Response(200, json={"choices": [vllm_choice(0, [20, 2], [-1.0, -0.5]),
                                              vllm_choice(1, [21, 2], [-1.0, -0.5])]}),
    ])
    sleeps = Sleeps()
    sampler = OpenAISampler(deployment=deployment(sleeps), wire=VLLM, model="student")

    samples = await sampler.sample(PROMPT, PARAMS)

    assert route.call_count == 2
    assert len(samples) == 2
    assert len(sleeps.delays) == 1
    assert body_of(route, 0) == body_of(route, 1)


@respx.mock
async def test_429_honours_retry_after() -> None:
    route = respx.post(f"{URL}/v1/completions").mock(side_effect=[
        httpx.Response(429, headers={"retry-after": "3"}, json={"message": "slow down"}),
        httpx.Response(200, json={"choices": [vllm_choice(0, [20, 2], [-1.0, -0.5])]}),
    ])
    sleeps = Sleeps()
    sampler = OpenAISampler(deployment=deployment(sleeps), wire=VLLM, model="student")

    await sampler.sample(PROMPT, SamplingParams(n=1, max_tokens=2))

    assert route.call_count == 2
    assert sleeps.delays[0] >= 3.0


@respx.mock
async def test_500_storm_gives_up_with_reason() -> None:
    route = respx.post(f"{URL}/v1/completions").respond(500, text="internal error")
    sleeps = Sleeps()
    sampler = OpenAISampler(deployment=deployment(sleeps, retries=3), wire=VLLM, model="student")

    with pytest.raises(BackendError) as info:
        await sampler.sample(PROMPT, PARAMS)

    assert info.value.reason == "http_5xx"
    assert route.call_count == 4
    assert len(sleeps.delays) == 3
    # Backoff grows (with jitter inside each doubling window).
    assert sleeps.delays[0] <= 0.1 < sleeps.delays[2]


@respx.mock
async def test_503_and_connect_errors_are_retried() -> None:
    route = respx.post(f"{URL}/v1/completions").mock(side_effect=[
        httpx.ConnectError("refused"), httpx.Response(503, text="busy"),
        httpx.Response(200, json={"choices": [vllm_choice(0, [20, 2], [-1.0, -0.5])]}),
    ])
    sampler = OpenAISampler(deployment=deployment(), wire=VLLM, model="student")

    samples = await sampler.sample(PROMPT, SamplingParams(n=1, max_tokens=2))

    assert route.call_count == 3
    assert len(samples) == 1


@respx.mock
async def test_4xx_is_not_retried() -> None:
    route = respx.post(f"{URL}/v1/completions").respond(404, json={"message": "model not found"})
    sampler = OpenAISampler(deployment=deployment(), wire=VLLM, model="student")

    with pytest.raises(BackendError) as info:
        await sampler.sample(PROMPT, PARAMS)

    assert info.value.reason == "http_4xx"
    assert route.call_count == 1


@respx.mock
async def test_truncated_json_is_bad_response() -> None:
    respx.post(f"{URL}/v1/completions").respond(200, content=b'{"choices": [{"index": 0, "tok',
                                                 headers={"content-type": "application/json"})
    sampler = OpenAISampler(deployment=deployment(), wire=VLLM, model="student")

    with pytest.raises(BackendError) as info:
        await sampler.sample(PROMPT, PARAMS)
    assert info.value.reason == "bad_response"


@respx.mock
async def test_teacher_timeouts_fail_samples_after_retries() -> None:
    route = respx.post(f"{URL}/v1/completions").mock(side_effect=httpx.ConnectTimeout("connect timed out"))
    scorer = OpenAIScorer(name="math", deployment=deployment(retries=1), wire=VLLM, model="teacher")

    scored = await scorer.score(PROMPT, [COMPLETION])

    assert scored[0].failure == "teacher_timeout"
    assert route.call_count == 2


@respx.mock
async def test_api_key_is_sent_and_never_logged() -> None:
    route = respx.post(f"{URL}/v1/completions").mock(side_effect=[
        httpx.Response(500, text="oops"), httpx.Response(200, json={"choices": [vllm_choice(0, [2], [-0.1])]}),
    ])
    sampler = OpenAISampler(deployment=deployment(api_key="sk-secret-123"), wire=VLLM, model="student")

    with structlog.testing.capture_logs() as events:
        await sampler.sample(PROMPT, SamplingParams(n=1, max_tokens=1))

    assert route.calls[0].request.headers["authorization"] == "Bearer sk-secret-123"
    assert [e["event"] for e in events] == ["http_call_error", "http_call_retry"]
    assert "sk-secret-123" not in repr(events)


# --- replicas ----------------------------------------------------------------------


@respx.mock
async def test_least_in_flight_balancing() -> None:
    urls = ("http://127.0.0.1:8001", "http://127.0.0.1:8002")
    release = anyio.Event()
    hits: dict[str, int] = {url: 0 for url in urls}

    async def handler(request: httpx.Request) -> httpx.Response:
        base = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        hits[base] += 1
        if sum(hits.values()) == 1:
            with anyio.fail_after(5):
                await release.wait()  # the replica of the first request stays busy
        return httpx.Response(200, json={"choices": [vllm_choice(0, [2], [-0.1])]})

    for url in urls:
        respx.post(f"{url}/v1/completions").mock(side_effect=handler)
    sampler = OpenAISampler(deployment=deployment(urls=urls), wire=VLLM, model="student")
    params = SamplingParams(n=1, max_tokens=1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sampler.sample, PROMPT, params)
        await anyio.sleep(0.05)
        for _ in range(3):
            await sampler.sample(PROMPT, params)  # each goes to the idle replica
        release.set()

    assert sorted(hits.values()) == [1, 3]


# --- weight sync ------------------------------------------------------------------


async def save_stub(directory: Path) -> None:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text("{}")


@respx.mock
async def test_lora_sync_switches_after_every_replica_confirms(tmp_path: Path) -> None:
    urls = ("http://127.0.0.1:8001", "http://127.0.0.1:8002")
    loads = [respx.post(f"{url}/v1/load_lora_adapter").respond(200, text="Success") for url in urls]
    unloads = [respx.post(f"{url}/v1/unload_lora_adapter").respond(200, text="Success") for url in urls]
    student = deployment(urls=urls)
    sampler = OpenAISampler(deployment=student, wire=VLLM, model="student")
    sync = ServerWeightSync(deployment=student, sampler=sampler, mode="lora", local_dir=tmp_path / "w",
                            server_dir="/mnt/weights", keep_versions=1)

    await sync.publish(version=1, save=save_stub)

    for route in loads:
        body = body_of(route)
        assert body["lora_path"] == "/mnt/weights/v000001"
        assert body["lora_name"].endswith("-v1")
    assert sampler.current_model == body_of(loads[0])["lora_name"]
    assert sampler.policy_version == 1

    await sync.publish(version=2, save=save_stub)

    assert sampler.policy_version == 2
    assert all(body_of(route)["lora_name"].endswith("-v1") for route in unloads)
    assert not (tmp_path / "w" / "v000001").exists()
    assert (tmp_path / "w" / "v000002").exists()


@respx.mock
async def test_failed_load_keeps_old_version(tmp_path: Path) -> None:
    respx.post(f"{URL}/v1/load_lora_adapter").respond(400, json={"message": "adapter invalid"})
    student = deployment()
    sampler = OpenAISampler(deployment=student, wire=VLLM, model="student")
    sync = ServerWeightSync(deployment=student, sampler=sampler, mode="lora", local_dir=tmp_path, server_dir=None)

    with pytest.raises(BackendError):
        await sync.publish(version=1, save=save_stub)

    assert sampler.current_model == "student"
    assert sampler.policy_version == 0


@respx.mock
async def test_disk_sync_keeps_name_and_checks_success(tmp_path: Path) -> None:
    route = respx.post(f"{URL}/update_weights_from_disk").mock(side_effect=[
        httpx.Response(200, json={"success": True, "message": "ok"}),
        httpx.Response(200, json={"success": False, "message": "shape mismatch"}),
    ])
    student = deployment()
    sampler = OpenAISampler(deployment=student, wire=Wire(dialect="sglang", score_mode="generate"), model="s")
    sync = ServerWeightSync(deployment=student, sampler=sampler, mode="disk", local_dir=tmp_path, server_dir=None)

    await sync.publish(version=1, save=save_stub)
    assert body_of(route)["model_path"] == str((tmp_path / "v000001").resolve())
    assert (sampler.current_model, sampler.policy_version) == ("s", 1)

    with pytest.raises(BackendError) as info:
        await sync.publish(version=2, save=save_stub)
    assert info.value.reason == "weight_update_failed"
    assert sampler.policy_version == 1


# --- settings -------------------------------------------------------------------------


def openai_env(**extra: str) -> dict[str, str]:
    env = {"MOPD_BACKEND": "openai", "MOPD_STUDENT_BASE_URLS": URL, "MOPD_STUDENT_MODEL": "student",
           "DISTILLATION_TEACHERS": "math", "MOPD_DATA_PATH": "rows.jsonl"}
    env.update(extra)
    return env


def test_temperature_needs_processed_logprobs() -> None:
    settings = load_settings(openai_env(MOPD_TEMPERATURE="0.7"))

    with pytest.raises(ConfigError, match="processed_logprobs"):
        check_openai_settings(settings)
    check_openai_settings(load_settings(openai_env(MOPD_TEMPERATURE="0.7", MOPD_OPENAI_PROCESSED_LOGPROBS="true")))


def test_student_urls_are_required_and_checked() -> None:
    with pytest.raises(ConfigError, match="MOPD_STUDENT_BASE_URLS"):
        check_openai_settings(load_settings(openai_env(MOPD_STUDENT_BASE_URLS="")))
    with pytest.raises(ConfigError, match="not an http"):
        check_openai_settings(load_settings(openai_env(MOPD_STUDENT_BASE_URLS="127.0.0.1:8000")))


def test_api_key_setting_is_secret() -> None:
    settings = load_settings(openai_env(MOPD_STUDENT_API_KEY="sk-secret-123"))

    assert "sk-secret-123" not in repr(settings)
    assert settings.student_api_key is not None
    assert settings.student_api_key.get_secret_value() == "sk-secret-123"
