"""Simulated student, teachers and trainer.

``BatchingServer`` models a continuous-batching inference server: it runs
decode steps over every running request at once. A step takes
``step_seconds`` while the running sequences fit ``capacity_sequences`` and
grows in proportion past that, so throughput is flat and latency rises
beyond the capacity. Requests beyond ``max_running_sequences`` wait in a
FIFO queue, and a request that finds ``max_waiting_requests`` already waiting
is rejected as overloaded (a 503). The capacity can change mid-run, and a
server can be stalled (it stops taking steps) and resumed.

The server runs as a task: start ``BatchingServer.run`` in a task group next
to the pipeline and cancel it at the end.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson

from mopd.backends.base import SamplingParams, ScoredCompletion
from mopd.concurrency import report_queue_signal
from mopd.errors import BackendError
from mopd.types import Datum, Sample, StepResult


@dataclass
class ServerModel:
    """Capacity and speed of a simulated batching server."""

    capacity_sequences: int = 32
    """Sequences a step serves at full speed."""
    step_seconds: float = 0.01
    """Duration of one step at or below capacity (one decode token, or one scoring pass)."""
    max_running_sequences: int | None = None
    """Sequences running at once; more wait in the queue. None means twice the capacity."""
    max_waiting_requests: int | None = None
    """Queued requests before new ones are rejected as overloaded. None never rejects."""
    report_queue_seconds: bool = True
    """Report each request's queue time as its queue signal (like a ``prefill-queue-duration`` header)."""


@dataclass(eq=False)
class _Request:
    sequences: int
    steps_left: int
    enqueued_at: float
    done: anyio.Event = field(default_factory=anyio.Event)
    started_at: float | None = None
    cancelled: bool = False


class BatchingServer:
    """A continuous-batching server on the event loop's clock."""

    def __init__(self, model: ServerModel) -> None:
        self.model = model
        self._max_running = model.max_running_sequences or 2 * model.capacity_sequences
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._work = anyio.Event()
        self._resumed = anyio.Event()
        self._resumed.set()
        self.requests_served = 0

    @property
    def waiting_requests(self) -> int:
        return len(self._waiting)

    def set_capacity(self, capacity_sequences: int) -> None:
        """Change the capacity; the running cap keeps its ratio to it."""
        ratio = self._max_running / self.model.capacity_sequences
        self.model.capacity_sequences = capacity_sequences
        self._max_running = max(1, round(ratio * capacity_sequences))

    def stall(self) -> None:
        """Stop taking steps: requests in flight and new ones wait until :meth:`resume`."""
        self._resumed = anyio.Event()

    def resume(self) -> None:
        self._resumed.set()

    async def request(self, *, sequences: int, steps: int) -> float:
        """Run one request to completion; return the seconds it waited in the queue.

        :raises BackendError: ``overloaded`` when the queue is full.
        """
        limit = self.model.max_waiting_requests
        if limit is not None and len(self._waiting) >= limit:
            raise BackendError("overloaded", f"simulated server queue is full ({limit} requests waiting)")
        request = _Request(sequences=sequences, steps_left=max(1, steps), enqueued_at=anyio.current_time())
        self._waiting.append(request)
        self._work.set()
        try:
            await request.done.wait()
        except BaseException:
            request.cancelled = True
            raise
        started_at = request.started_at if request.started_at is not None else request.enqueued_at
        return started_at - request.enqueued_at

    async def run(self) -> None:
        """Serve requests until cancelled."""
        while True:
            self._admit()
            if not self._running:
                self._work = anyio.Event()
                if not self._waiting:
                    await self._work.wait()
                continue
            await self._resumed.wait()

            batch = sum(r.sequences for r in self._running)
            await anyio.sleep(self.model.step_seconds * max(1.0, batch / self.model.capacity_sequences))

            still_running = []
            for request in self._running:
                request.steps_left -= 1
                if request.cancelled:
                    continue
                if request.steps_left <= 0:
                    self.requests_served += 1
                    request.done.set()
                else:
                    still_running.append(request)
            self._running = still_running

    def _admit(self) -> None:
        running = sum(r.sequences for r in self._running)
        now = anyio.current_time()
        while self._waiting:
            head = self._waiting[0]
            if head.cancelled:
                self._waiting.popleft()
                continue
            # A request larger than the cap still runs alone, so it cannot wait forever.
            if self._running and running + head.sequences > self._max_running:
                break
            self._waiting.popleft()
            head.started_at = now
            self._running.append(head)
            running += head.sequences


def _completion(tokens: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    return tuple(range(100, 100 + tokens)), (-0.5,) * tokens


class SimRenderer:
    """A prompt renderer that maps every chat to the same ``prompt_tokens`` ids."""

    eos_token_id = 2
    pad_token_id = 0

    def __init__(self, prompt_tokens: int = 16) -> None:
        self._prompt_ids = tuple(range(10, 10 + prompt_tokens))

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        return "".join(str(m.get("content", "")) for m in messages)

    def encode(self, messages: Sequence[dict[str, Any]]) -> tuple[int, ...]:
        return self._prompt_ids

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(map(str, ids))


class SimStudent:
    """A student sampler served by a :class:`BatchingServer`; each completion
    takes ``params.max_tokens`` decode steps."""

    def __init__(self, server: BatchingServer) -> None:
        self.server = server
        self.policy_version = 0
        self.latencies: list[tuple[float, float]] = []
        """(finish time, latency seconds) of every successful request."""

    async def sample(self, prompt_ids_T: Sequence[int], params: SamplingParams) -> list[Sample]:
        started = anyio.current_time()
        version = self.policy_version
        queued = await self.server.request(sequences=params.n, steps=params.max_tokens)
        finished = anyio.current_time()
        self.latencies.append((finished, finished - started))
        if self.server.model.report_queue_seconds:
            report_queue_signal(queued)
        ids, logprobs = _completion(params.max_tokens)
        sample = Sample(completion_ids_T=ids, sampling_logprobs_T=logprobs, finish_reason="length",
                        policy_version=version)
        return [sample] * params.n

    async def aclose(self) -> None:
        return None


class SimScorer:
    """A teacher served by a :class:`BatchingServer`; scoring a group is one step."""

    def __init__(self, name: str, server: BatchingServer) -> None:
        self.name = name
        self.server = server

    async def score(
        self, prompt_ids_T: Sequence[int], completions_S: Sequence[Sequence[int]]
    ) -> list[ScoredCompletion]:
        await self.server.request(sequences=len(completions_S), steps=1)
        return [ScoredCompletion(logprobs_T=(-0.25,) * len(c)) for c in completions_S]

    async def aclose(self) -> None:
        return None


class SimTrainer:
    """A trainer whose step takes ``step_seconds`` plus ``sync_seconds`` of weight publication."""

    def __init__(self, student: SimStudent | InstantSampler, *, step_seconds: float, sync_seconds: float = 0.0):
        self.student = student
        self.step_seconds = step_seconds
        self.sync_seconds = sync_seconds
        self.policy_version = 0
        self.steps: list[tuple[float, int]] = []
        """(finish time, datums) of every step."""

    async def train_step(self, datums: Sequence[Datum], loss_fn: str) -> StepResult:
        started = anyio.current_time()
        if self.step_seconds + self.sync_seconds > 0:
            await anyio.sleep(self.step_seconds + self.sync_seconds)
        else:
            await anyio.lowlevel.checkpoint()
        self.policy_version += 1
        self.student.policy_version = self.policy_version
        finished = anyio.current_time()
        self.steps.append((finished, len(datums)))
        return StepResult(
            step=self.policy_version, policy_version=self.policy_version, loss=0.0, grad_norm=0.0,
            datums=len(datums), tokens=sum(len(d.target_ids_T) for d in datums), seconds=finished - started,
        )

    async def save_state(self, path: Path) -> None:
        return None

    async def load_state(self, path: Path) -> None:
        return None

    async def aclose(self) -> None:
        return None


class InstantSampler:
    """A student that returns at once with ``params.max_tokens`` tokens per completion."""

    def __init__(self) -> None:
        self.policy_version = 0
        self._cache: dict[tuple[int, int, int], list[Sample]] = {}

    async def sample(self, prompt_ids_T: Sequence[int], params: SamplingParams) -> list[Sample]:
        await anyio.lowlevel.checkpoint()
        key = (params.n, params.max_tokens, self.policy_version)
        samples = self._cache.get(key)
        if samples is None:
            ids, logprobs = _completion(params.max_tokens)
            sample = Sample(completion_ids_T=ids, sampling_logprobs_T=logprobs, finish_reason="length",
                            policy_version=self.policy_version)
            samples = self._cache[key] = [sample] * params.n
            if len(self._cache) > 64:
                self._cache.clear()
        return list(samples)

    async def aclose(self) -> None:
        return None


class InstantScorer:
    """A teacher that scores at once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._logprobs: dict[int, tuple[float, ...]] = {}

    async def score(
        self, prompt_ids_T: Sequence[int], completions_S: Sequence[Sequence[int]]
    ) -> list[ScoredCompletion]:
        await anyio.lowlevel.checkpoint()
        out = []
        for completion in completions_S:
            logprobs = self._logprobs.get(len(completion))
            if logprobs is None:
                logprobs = self._logprobs[len(completion)] = (-0.25,) * len(completion)
            out.append(ScoredCompletion(logprobs_T=logprobs))
        return out

    async def aclose(self) -> None:
        return None


class InstantTrainer(SimTrainer):
    """A trainer whose steps take no time."""

    def __init__(self, student: SimStudent | InstantSampler) -> None:
        super().__init__(student, step_seconds=0.0)


def write_rows(path: Path, *, rows: int, routes: Sequence[str], route_key: str = "teacher") -> Path:
    """Write ``rows`` JSONL rows, routed round-robin over ``routes``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        for index in range(rows):
            row = {"messages": [{"role": "user", "content": f"Solve {index} + {index}."}],
                   route_key: routes[index % len(routes)]}
            handle.write(orjson.dumps(row) + b"\n")
    return path


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (nearest rank)."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    index = min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))
    return ordered[index]
