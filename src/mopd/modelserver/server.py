"""``mopd model-server``: serve a transformers model directory over HTTP.

Routes (request and response fields follow vLLM's OpenAI-compatible server):

    POST /v1/completions          prompt as token ids; n, max_tokens, temperature,
                                  logprobs, echo, prompt_logprobs, return_token_ids,
                                  return_tokens_as_token_ids, stop_token_ids
    POST /v1/load_lora_adapter    {lora_name, lora_path}: load a peft LoRA adapter
                                  (merged onto the weights the server started
                                  with) or a full-weights save_pretrained
                                  directory, and serve it as lora_name
    POST /v1/unload_lora_adapter  {lora_name}
    POST /update_weights_from_disk {model_path}: load new weights, keep the name
    GET  /v1/models, /health, /metrics

Concurrent requests are batched on one device thread, so load shows up as
queueing (``vllm:num_requests_waiting``) and latency
(``vllm:e2e_request_latency_seconds``). Sampling logprobs are taken after
temperature, as with vLLM's ``--logprobs-mode processed_logprobs``.

NOTE: the server keeps one set of weights. Loading new weights replaces the
old ones, and requests that name an earlier model get 404.
"""

from __future__ import annotations

import json
import math
import secrets
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog
import torch
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from safetensors.torch import load_file
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from mopd.backends.local.executor import DeviceExecutor
from mopd.backends.local.models import completion_logprobs, generate, load_causal_lm

log = structlog.get_logger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class RequestError(Exception):
    """A request the server rejects, with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class ModelService:
    """One model on one device, with the batching executor and the server metrics."""

    def __init__(
        self,
        *,
        model_dir: Path,
        served_name: str,
        device: torch.device,
        max_batch_size: int = 64,
        batch_wait_seconds: float = 0.005,
        seed: int = 0,
    ) -> None:
        self.model = load_causal_lm(model_dir, device=device)
        # LoRA adapters apply to the weights the server started with, not to the last adapter loaded.
        self._base_state = {key: tensor.detach().clone() for key, tensor in self.model.state_dict().items()}
        self.device = device
        self.served_name = served_name
        config = self.model.config
        eos = config.eos_token_id
        self.eos_token_ids: tuple[int, ...] = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        self.pad_token_id: int = config.pad_token_id if config.pad_token_id is not None else (self.eos_token_ids or (0,))[0]
        self.context_window: int | None = getattr(config, "max_position_embeddings", None)
        self.executor = DeviceExecutor(max_batch_size=max_batch_size, batch_wait_seconds=batch_wait_seconds)
        self._generator = torch.Generator(device=device).manual_seed(seed)
        self._load_lock = anyio.Lock()

        # vLLM's metric names, labelled with the name the server started with.
        self.registry = CollectorRegistry()
        label = {"model_name": served_name}
        waiting = Gauge("vllm:num_requests_waiting", "Batch jobs queued and not yet started.", ["model_name"],
                        registry=self.registry)
        waiting.labels(**label).set_function(lambda: self.executor.waiting)
        running = Gauge("vllm:num_requests_running", "Batch jobs in the batch that runs now.", ["model_name"],
                        registry=self.registry)
        running.labels(**label).set_function(lambda: self.executor.running)
        self.latency = Histogram("vllm:e2e_request_latency_seconds", "Time from request arrival to response.",
                                 ["model_name"], buckets=LATENCY_BUCKETS, registry=self.registry).labels(**label)
        self.successes = Counter("vllm:request_success", "Requests answered with 2xx.", ["model_name"],
                                 registry=self.registry).labels(**label)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", ["model_name"],
                                     registry=self.registry).labels(**label)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", ["model_name"],
                                         registry=self.registry).labels(**label)

    # --- completions ------------------------------------------------------------

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """Build the response to one /v1/completions request body."""
        request = _CompletionRequest.parse(body, served_name=self.served_name, context_window=self.context_window)
        prompt = request.prompt

        samples: list[tuple[list[int], list[float], str]]
        if request.max_tokens > 0:
            key = ("sample", request.temperature, request.max_tokens, request.stop_token_ids)
            samples = await self.executor.submit(key=key, run=self._sample_batch, payload=(prompt, request),
                                                 size=request.n)
        else:
            samples = [([], [], "length") for _ in range(request.n)]
        prompt_lps: list[float] = []
        if request.echo or request.prompt_logprobs is not None:
            prompt_lps = await self.executor.submit(key=("score",), run=self._score_batch, payload=prompt)

        choices = [request.choice(index, ids, lps, reason, prompt_lps) for index, (ids, lps, reason)
                   in enumerate(samples)]
        generated = sum(len(ids) for ids, _, _ in samples)
        self.prompt_tokens.inc(len(prompt))
        self.generation_tokens.inc(generated)
        return {
            "id": f"cmpl-{secrets.token_hex(8)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.served_name,
            "choices": choices,
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": generated,
                      "total_tokens": len(prompt) + generated},
        }

    def _sample_batch(self, payloads: list[tuple[list[int], _CompletionRequest]]) -> list[Any]:
        first = payloads[0][1]
        prompts = [prompt for prompt, request in payloads for _ in range(request.n)]
        results = generate(
            self.model, prompts, max_tokens=first.max_tokens, temperature=first.temperature,
            stop_token_ids=self.eos_token_ids + first.stop_token_ids, pad_token_id=self.pad_token_id,
            generator=self._generator,
        )
        grouped, cursor = [], 0
        for _, request in payloads:
            grouped.append(results[cursor:cursor + request.n])
            cursor += request.n
        return grouped

    def _score_batch(self, prompts: list[list[int]]) -> list[list[float]]:
        # Logprob of every prompt token after the first, given the tokens before it.
        return completion_logprobs(self.model, [(p[:1], p[1:]) for p in prompts], pad_token_id=self.pad_token_id)

    # --- weights ----------------------------------------------------------------

    async def load_weights(self, path: str, *, name: str | None) -> None:
        """Load a save_pretrained directory or a peft adapter into the served model; serve it as ``name`` when given.

        An adapter directory (``adapter_config.json``) is merged onto the
        weights the server started with, as vLLM applies a LoRA adapter to its base model.
        """
        directory = Path(path)
        is_adapter = (directory / "adapter_config.json").is_file() and not (directory / "config.json").is_file()
        if not is_adapter and not (directory / "config.json").is_file():
            raise RequestError(400, f"{path!r} is neither a save_pretrained directory (config.json) nor a peft "
                                    "adapter directory (adapter_config.json); pass a directory written by save_pretrained")
        async with self._load_lock:
            started = time.monotonic()
            if is_adapter:
                state = await anyio.to_thread.run_sync(lambda: merge_adapter(self._base_state, directory))
            else:
                fresh = await anyio.to_thread.run_sync(lambda: load_causal_lm(directory, device=self.device))
                state = fresh.state_dict()
            try:
                await self.executor.call(lambda: self.model.load_state_dict(state))
            except RuntimeError as exc:
                raise RequestError(400, f"weights in {path!r} do not fit the served model: {exc}") from exc
            if name is not None:
                self.served_name = name
        log.info("weights_loaded", path=path, model=self.served_name, adapter=is_adapter,
                 seconds=round(time.monotonic() - started, 3))

    def close(self) -> None:
        # Called after the server loop ends: wait for the running batch, since
        # a torch call still running at interpreter shutdown aborts the process.
        self.executor.close()
        self.executor.join(60.0)


_ADAPTER_PREFIX = "base_model.model."
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"


def merge_adapter(base_state: dict[str, torch.Tensor], directory: Path) -> dict[str, torch.Tensor]:
    """Return ``base_state`` with the peft LoRA adapter in ``directory`` merged in.

    Each adapted linear weight becomes ``W + scale * B @ A`` with ``scale``
    ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rsLoRA). Raises
    RequestError when the adapter is unreadable or names a weight the model lacks.
    """
    try:
        config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
        tensors = load_file(str(directory / "adapter_model.safetensors"))
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RequestError(400, f"invalid LoRA adapter in {str(directory)!r} ({exc}); write it with peft's "
                                "save_pretrained, which writes adapter_config.json and adapter_model.safetensors") from exc
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    merged = dict(base_state)
    for key, lora_a in tensors.items():
        if not key.endswith(_LORA_A):
            continue
        module = key.removeprefix(_ADAPTER_PREFIX).removesuffix(_LORA_A)
        lora_b = tensors.get(key.removesuffix(_LORA_A) + _LORA_B)
        target = f"{module}.weight"
        if lora_b is None or target not in base_state:
            raise RequestError(400, f"the LoRA adapter in {str(directory)!r} adapts {module!r}, which the served "
                                    "model does not have (or its lora_B matrix is missing); train the adapter on "
                                    "this model")
        base = base_state[target]
        update = scale * (lora_b.to(torch.float32) @ lora_a.to(torch.float32))
        merged[target] = (base.to(torch.float32) + update.to(base.device)).to(base.dtype)
    return merged


class _CompletionRequest:
    """The validated fields of one /v1/completions body."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    prompt: list[int]
    n: int
    max_tokens: int
    temperature: float
    logprobs: int | None
    echo: bool
    prompt_logprobs: int | None
    return_token_ids: bool
    tokens_as_ids: bool
    stop_token_ids: tuple[int, ...]

    @classmethod
    def parse(cls, body: Any, *, served_name: str, context_window: int | None) -> _CompletionRequest:
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != served_name:
            raise RequestError(404, f"The model `{model}` does not exist; this server serves `{served_name}`.")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
            prompt = prompt[0]
        if not isinstance(prompt, list) or not prompt or not all(isinstance(t, int) and t >= 0 for t in prompt):
            raise RequestError(400, "prompt must be a non-empty list of token ids; this server takes no text")
        fields = {
            "prompt": prompt,
            "n": _int(body, "n", 1, minimum=1),
            "max_tokens": _int(body, "max_tokens", 16, minimum=0),
            "temperature": float(body.get("temperature") if body.get("temperature") is not None else 1.0),
            "logprobs": body.get("logprobs"),
            "echo": bool(body.get("echo", False)),
            "prompt_logprobs": body.get("prompt_logprobs"),
            "return_token_ids": bool(body.get("return_token_ids", False)),
            "tokens_as_ids": bool(body.get("return_tokens_as_token_ids", False)),
            "stop_token_ids": tuple(int(t) for t in body.get("stop_token_ids") or ()),
        }
        if fields["temperature"] < 0 or not math.isfinite(fields["temperature"]):
            raise RequestError(400, f"temperature must be >= 0, got {fields['temperature']}")
        if fields["max_tokens"] == 0 and not (fields["echo"] or fields["prompt_logprobs"] is not None):
            raise RequestError(400, "max_tokens must be > 0 unless echo or prompt_logprobs is set")
        if context_window is not None and len(prompt) + fields["max_tokens"] > context_window:
            raise RequestError(400, f"prompt ({len(prompt)} tokens) plus max_tokens ({fields['max_tokens']}) exceeds "
                               f"the context window of {context_window} tokens")
        return cls(**fields)

    def choice(
        self, index: int, ids: Sequence[int], lps: Sequence[float], reason: str, prompt_lps: Sequence[float]
    ) -> dict[str, Any]:
        """Build one choice of the response."""
        choice: dict[str, Any] = {"index": index, "text": "", "finish_reason": reason, "stop_reason": None}
        if self.logprobs is not None:
            token_ids = list(self.prompt) + list(ids) if self.echo else list(ids)
            values: list[float | None] = ([None, *prompt_lps, *lps] if self.echo else list(lps))
            tokens = [self._token(t) for t in token_ids]
            choice["logprobs"] = {
                "tokens": tokens,
                "token_logprobs": values,
                "top_logprobs": [{tok: v} if v is not None else None for tok, v in zip(tokens, values, strict=True)],
                "text_offset": [0] * len(tokens),
            }
        if self.return_token_ids:
            choice["token_ids"] = list(ids)
            choice["prompt_token_ids"] = list(self.prompt)
        if self.prompt_logprobs is not None:
            # NOTE: rank is null: the batch job computes the logprob of the sent token only.
            choice["prompt_logprobs"] = [None] + [
                {str(t): {"logprob": v, "rank": None, "decoded_token": self._token(t)}}
                for t, v in zip(self.prompt[1:], prompt_lps, strict=True)
            ]
        return choice

    def _token(self, token_id: int) -> str:
        return f"token_id:{token_id}"


def _int(body: dict[str, Any], name: str, default: int, *, minimum: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RequestError(400, f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


# --- HTTP ------------------------------------------------------------------------


def _error(status: int, message: str) -> JSONResponse:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return JSONResponse({"object": "error", "message": message, "type": kind, "code": status}, status_code=status)


async def _json_body(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError as exc:
        raise RequestError(400, f"the request body is not valid JSON: {exc}") from exc


def build_app(service: ModelService) -> Starlette:
    """Build the Starlette application that serves ``service``."""

    async def completions(request: Request) -> Response:
        started = time.monotonic()
        try:
            result = await service.complete(await _json_body(request))
        except RequestError as exc:
            log.info("request_rejected", path="/v1/completions", status=exc.status, error=str(exc))
            return _error(exc.status, str(exc))
        service.latency.observe(time.monotonic() - started)
        service.successes.inc()
        return JSONResponse(result)

    async def load_adapter(request: Request) -> Response:
        try:
            body = await _json_body(request)
            name, path = body.get("lora_name"), body.get("lora_path")
            if not isinstance(name, str) or not isinstance(path, str):
                raise RequestError(400, "lora_name and lora_path must be strings")
            await service.load_weights(path, name=name)
        except RequestError as exc:
            return _error(exc.status, str(exc))
        return PlainTextResponse(f"Success: weights {name!r} loaded from {path!r}.")

    async def unload_adapter(request: Request) -> Response:
        try:
            body = await _json_body(request)
        except RequestError as exc:
            return _error(exc.status, str(exc))
        name = body.get("lora_name") if isinstance(body, dict) else None
        if name == service.served_name:
            return _error(400, f"{name!r} is the model this server serves now; load other weights first")
        # Replaced weights are already gone (the server keeps one set), so there is nothing to free.
        return PlainTextResponse(f"Success: {name!r} unloaded.")

    async def update_from_disk(request: Request) -> Response:
        try:
            body = await _json_body(request)
            path = body.get("model_path") if isinstance(body, dict) else None
            if not isinstance(path, str):
                raise RequestError(400, "model_path must be a string")
            await service.load_weights(path, name=None)
        except RequestError as exc:
            return JSONResponse({"success": False, "message": str(exc)}, status_code=exc.status)
        return JSONResponse({"success": True, "message": f"loaded {path}"})

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": service.served_name, "object": "model"}]})

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/load_lora_adapter", load_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_adapter, methods=["POST"]),
        Route("/update_weights_from_disk", update_from_disk, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ])


def run_server(
    *,
    model_dir: Path,
    host: str,
    port: int,
    served_name: str,
    device: torch.device,
    max_batch_size: int,
    batch_wait_seconds: float,
    seed: int,
) -> None:
    """Load the model and serve it until SIGINT or SIGTERM.

    Prints ``listening on http://HOST:PORT`` on stdout once the socket is bound
    (``port`` 0 picks a free port), so a parent process can read the address.
    """
    import uvicorn

    service = ModelService(model_dir=model_dir, served_name=served_name, device=device,
                           max_batch_size=max_batch_size, batch_wait_seconds=batch_wait_seconds, seed=seed)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    url_host = f"[{host}]" if family == socket.AF_INET6 else host
    log.info("model_server_listening", url=f"http://{url_host}:{bound}", model=served_name, directory=str(model_dir))
    print(f"listening on http://{url_host}:{bound}", flush=True)

    config = uvicorn.Config(build_app(service), log_level="warning", access_log=False, lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        service.close()
        log.info("model_server_stopped", model=service.served_name)
