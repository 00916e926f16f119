"""An in-memory Tinker service for respx: the HTTP routes the tinker SDK calls.

Every call is recorded with its decoded body, so tests can check what the
backend sent. Requests that create work return a future id, and
``/api/v1/retrieve_future`` returns the result: JSON for most types, and
protobuf for sample and forward_backward results, as the SDK expects.

The "models" are deterministic: a sampler returns tokens ``prompt[-1] + 1``,
``+ 2``, ... with logprob ``-0.5`` each, and prompt logprobs are ``-0.25`` at
every position but the first.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import orjson
from tinker.proto import tinker_public_pb2 as public_pb
from tinker.types.topk_logprobs import MASK_LOGPROB

BASE_URL = "http://tinker.test"
SAMPLE_LOGPROB = -0.5
PROMPT_LOGPROB = -0.25
LOSS_SUM = 1.5


@dataclass
class RecordedCall:
    path: str
    body: Any
    headers: dict[str, str]


@dataclass
class FakeTinker:
    """State of the fake service; ``handle`` is the respx side effect."""

    calls: list[RecordedCall] = field(default_factory=list)
    futures: dict[str, tuple[str, Any]] = field(default_factory=dict)
    sampling_sessions: dict[str, str | None] = field(default_factory=dict)
    """Sampling session id -> the tinker:// path (or base model) it samples from."""
    saved_paths: list[str] = field(default_factory=list)
    unscored_prefix: int = 1
    """Leading prompt positions whose logprob is None (NaN on the wire). The default 1 leaves only the first token unscored."""
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def paths(self) -> list[str]:
        """Paths of the recorded calls that do work, in order (no polling or housekeeping)."""
        skip = {"/api/v1/retrieve_future", "/api/v1/telemetry", "/api/v1/session_heartbeat",
                "/api/v1/client/config", "/api/v1/client/dynamic_config"}
        return [call.path for call in self.calls if call.path not in skip]

    def bodies(self, path: str) -> list[Any]:
        return [call.body for call in self.calls if call.path == path]

    # --- routing ---------------------------------------------------------------

    def handle(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = self._decode(request)
        self.calls.append(RecordedCall(path=path, body=body, headers=dict(request.headers)))
        if path == "/api/v1/client/config":
            return _json({"use_pyqwest_transport": False, "pjwt_auth_enabled": False})
        if path == "/api/v1/client/dynamic_config":
            return _json({"refresh_interval_sec": 3600})
        if path == "/api/v1/create_session":
            return _json({"type": "create_session", "session_id": "session-1"})
        if path in ("/api/v1/session_heartbeat",):
            return _json({"type": "session_heartbeat"})
        if path == "/api/v1/telemetry":
            return _json({"status": "accepted"})
        if path.startswith("/api/v1/sessions/") and path.endswith("/finish"):
            return _json({})
        if path == "/api/v1/create_model":
            return self._future("create_model", body)
        if path == "/api/v1/get_info":
            return _json({"type": "get_info", "model_id": body["model_id"], "is_lora": True,
                          "model_data": {"arch": "qwen2", "model_name": "student-base"}})
        if path == "/api/v1/forward_backward":
            return self._future("forward_backward", body)
        if path == "/api/v1/optim_step":
            return self._future("optim_step", body)
        if path == "/api/v1/save_weights_for_sampler":
            return self._future("save_weights_for_sampler", body)
        if path == "/api/v1/save_weights":
            return self._future("save_weights", body)
        if path == "/api/v1/load_weights":
            return self._future("load_weights", body)
        if path == "/api/v1/create_sampling_session":
            session = f"sampler-{next(self._ids)}"
            self.sampling_sessions[session] = body.get("model_path") or body.get("base_model")
            return _json({"type": "create_sampling_session", "sampling_session_id": session})
        if path.startswith("/api/v1/samplers/"):
            session = path.rsplit("/", 1)[-1]
            return _json({"sampler_id": session, "base_model": "student-base",
                          "model_path": self.sampling_sessions.get(session)})
        if path == "/api/v1/asample":
            return self._future("asample", body, sequences=body["num_samples"])
        if path == "/api/v1/retrieve_future":
            return self._retrieve(body["request_id"])
        return httpx.Response(404, json={"detail": f"the fake Tinker service has no route {path}"})

    def _decode(self, request: httpx.Request) -> Any:
        content = request.content
        if not content:
            return None
        if request.headers.get("content-type", "").startswith("application/x-protobuf"):
            message = public_pb.ForwardBackwardRequest()
            message.ParseFromString(content)
            return message
        return orjson.loads(content)

    def _future(self, kind: str, body: Any, *, sequences: int = 0) -> httpx.Response:
        request_id = f"future-{next(self._ids)}"
        self.futures[request_id] = (kind, body)
        answer: dict[str, Any] = {"request_id": request_id}
        if sequences:
            answer["sample_sequence_ids"] = [f"{request_id}-{i}" for i in range(sequences)]
        return _json(answer)

    # --- results ---------------------------------------------------------------

    def _retrieve(self, request_id: str) -> httpx.Response:
        kind, body = self.futures[request_id]
        if kind == "create_model":
            return _json({"type": "create_model", "model_id": "model-1"})
        if kind == "optim_step":
            return _json({"metrics": {"grad_norm": 0.75}})
        if kind in ("save_weights_for_sampler", "save_weights"):
            path = f"tinker://model-1/{'sampler_weights' if kind != 'save_weights' else 'weights'}/{body['path']}"
            self.saved_paths.append(path)
            return _json({"type": kind, "path": path})
        if kind == "load_weights":
            return _json({"type": "load_weights", "path": body["path"]})
        if kind == "forward_backward":
            return _proto(self._forward_backward_output(body))
        if kind == "asample":
            return _proto(self._sample_response(body))
        raise AssertionError(f"unknown future kind {kind}")

    def _forward_backward_output(self, request: Any) -> public_pb.ForwardBackwardOutput:
        lengths = [sum(len(chunk.encoded_text.tokens) // 4 for chunk in datum.model_input) for datum in request.data]
        output = public_pb.ForwardBackwardOutput()
        output.loss_fn_output_type = "ArrayRecord"
        output.metrics["loss:sum"] = LOSS_SUM
        record = output.loss_fn_outputs.add()
        record.num_datums = len(lengths)
        logprobs = record.fields["logprobs"]
        logprobs.dtype = public_pb.DTYPE_FLOAT32
        offsets = np.cumsum([0, *[4 * n for n in lengths]]).astype(np.int64)
        logprobs.offsets = offsets.tobytes()
        logprobs.data = np.full(sum(lengths), -1.0, dtype=np.float32).tobytes()
        return output

    def _sample_response(self, request: dict[str, Any]) -> public_pb.SampleResponse:
        prompt = [token for chunk in request["prompt"]["chunks"] for token in chunk["tokens"]]
        params = request["sampling_params"]
        response = public_pb.SampleResponse()
        for _ in range(request["num_samples"]):
            sequence = response.sequences.add()
            tokens = [prompt[-1] + i + 1 for i in range(params["max_tokens"])]
            sequence.tokens = np.asarray(tokens, dtype=np.int32).tobytes()
            sequence.logprobs = np.full(len(tokens), SAMPLE_LOGPROB, dtype=np.float32).tobytes()
            sequence.stop_reason = public_pb.STOP_REASON_LENGTH
        if request.get("prompt_logprobs"):
            values = np.full(len(prompt), PROMPT_LOGPROB, dtype=np.float32)
            values[: self.unscored_prefix] = np.nan
            last_n = request.get("prompt_logprobs_last_n")
            if last_n:
                values[: len(prompt) - last_n] = np.nan
            response.prompt_logprobs = values.tobytes()
        k = request.get("topk_prompt_logprobs") or 0
        if k:
            # Candidate j at position p is token p + j with logprob PROMPT_LOGPROB * (j + 1).
            # Unscored positions carry the SDK's mask (id 0, MASK_LOGPROB).
            ids = np.zeros((len(prompt), k), dtype=np.int32)
            logprobs = np.full((len(prompt), k), MASK_LOGPROB, dtype=np.float32)
            for position in range(len(prompt)):
                if not np.isnan(values[position]):
                    ids[position] = [position + j for j in range(k)]
                    logprobs[position] = [PROMPT_LOGPROB * (j + 1) for j in range(k)]
            response.topk_prompt_logprobs.length = len(prompt)
            response.topk_prompt_logprobs.k = k
            response.topk_prompt_logprobs.token_ids = ids.tobytes()
            response.topk_prompt_logprobs.logprobs = logprobs.tobytes()
        return response


def _json(data: Any) -> httpx.Response:
    return httpx.Response(200, json=data)


def _proto(message: Any) -> httpx.Response:
    return httpx.Response(200, content=message.SerializeToString(),
                          headers={"content-type": "application/x-protobuf"})
