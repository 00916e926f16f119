"""Student sampler and teacher scorer over HTTP."""

from __future__ import annotations

from collections.abc import Sequence

import anyio
import structlog

from mopd.backends.base import SamplingParams, ScoredCompletion
from mopd.backends.openai.client import Deployment
from mopd.backends.openai.dialects import Wire, parse_samples, parse_score, sample_request, score_request
from mopd.errors import BackendError
from mopd.types import Sample

log = structlog.get_logger(__name__)


class OpenAISampler:
    """Samples the student on an inference server.

    The served model name and the policy version change together, and only
    after the server confirmed it loaded the new weights (see
    :class:`~mopd.backends.openai.weights.ServerWeightSync`). A request reads
    both once, before it is sent, so every sample carries the version of the
    weights it was sampled from.
    """

    def __init__(self, *, deployment: Deployment, wire: Wire, model: str, name: str = "student") -> None:
        self.name = name
        self._deployment = deployment
        self._wire = wire
        self._base_model = model
        self._model = model
        self._version = 0
        self.last_queue_seconds: dict[str, float] = {}
        """Queue times from the last response's headers (Fireworks-style servers), by header name."""

    @property
    def policy_version(self) -> int:
        return self._version

    @property
    def current_model(self) -> str:
        """Model name that new requests select: the base model or the latest adapter."""
        return self._model

    def switch_model(self, *, model: str, version: int) -> None:
        """Send later requests to ``model`` and stamp their samples with ``version``."""
        self._model = model
        self._version = version

    async def sample(self, prompt_ids_T: Sequence[int], params: SamplingParams) -> list[Sample]:
        if not prompt_ids_T:
            raise ValueError("cannot sample from an empty prompt")
        model, version = self._model, self._version
        adapter = model if model != self._base_model else None
        path, body = sample_request(self._wire, model=model, prompt_ids_T=prompt_ids_T, params=params, adapter=adapter)
        response = await self._deployment.post_json(path, body)
        if response.queue_seconds:
            self.last_queue_seconds = response.queue_seconds
            log.debug("student_server_queue", deployment=self._deployment.name, replica=response.replica,
                      **response.queue_seconds)
        return parse_samples(self._wire, response.body, n=params.n, policy_version=version,
                             deployment=self._deployment.name)

    async def aclose(self) -> None:
        # The deployment may be shared (a teacher's scorer and its evaluation sampler); its owner closes it.
        return None


class OpenAIScorer:
    """Scores completions under a teacher on an inference server, one request per completion.

    Requests for the completions of one group run concurrently, and each
    completion succeeds or fails on its own: an HTTP failure after retries
    fails that completion with ``teacher_<reason>``, an alignment failure with
    its reason code (see :mod:`mopd.backends.openai.dialects`).
    """

    def __init__(self, *, name: str, deployment: Deployment, wire: Wire, model: str) -> None:
        self.name = name
        self._deployment = deployment
        self._wire = wire
        self._model = model

    async def score(
        self, prompt_ids_T: Sequence[int], completions_S: Sequence[Sequence[int]], *, top_k: int = 0
    ) -> list[ScoredCompletion]:
        if not prompt_ids_T:
            raise ValueError("cannot score after an empty prompt")
        results_S: list[ScoredCompletion | None] = [None] * len(completions_S)

        async def score_one(index: int, completion_T: Sequence[int]) -> None:
            results_S[index] = await self._score_one(prompt_ids_T, completion_T, top_k=top_k)

        async with anyio.create_task_group() as tg:
            for index, completion_T in enumerate(completions_S):
                tg.start_soon(score_one, index, completion_T)
        return [result for result in results_S if result is not None]

    async def _score_one(
        self, prompt_ids_T: Sequence[int], completion_T: Sequence[int], *, top_k: int = 0
    ) -> ScoredCompletion:
        # An empty completion has nothing to score; the advantage stage rejects it as empty_completion.
        if not completion_T:
            return ScoredCompletion(logprobs_T=(), echoed_ids_T=())
        path, body = score_request(self._wire, model=self._model, prompt_ids_T=prompt_ids_T,
                                   completion_ids_T=completion_T, top_k=top_k)
        try:
            response = await self._deployment.post_json(path, body)
        except BackendError as exc:
            return ScoredCompletion(logprobs_T=None, failure=f"teacher_{exc.reason}")
        try:
            return parse_score(self._wire, response.body, prompt_ids_T=prompt_ids_T, completion_ids_T=completion_T,
                               deployment=self._deployment.name, top_k=top_k)
        except BackendError as exc:
            log.warning("teacher_response_rejected", deployment=self._deployment.name, reason=exc.reason,
                        error=str(exc))
            return ScoredCompletion(logprobs_T=None, failure=f"teacher_{exc.reason}")

    async def aclose(self) -> None:
        return None
