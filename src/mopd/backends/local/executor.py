"""One worker thread that runs every torch job of the local backend.

All models of the local backend share one device, so their work runs on one
thread in arrival order, like kernels on one CUDA stream. Requests of the same
kind for the same model that arrive within ``batch_wait_seconds`` of each other
run as one batch, so concurrent callers see batching, queueing and latency
much as they would from an inference server.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

log = structlog.get_logger(__name__)

BatchFn = Callable[[list[Any]], list[Any]]


@dataclass
class _Job:
    key: Hashable | None
    """Jobs with the same key are batched together; None never batches."""
    run: BatchFn
    payload: Any
    size: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    enqueued_at: float = field(default_factory=time.monotonic)


class DeviceExecutor:
    """Runs batched jobs on one daemon thread.

    :param max_batch_size: maximum items (sum of job sizes) in one batch.
    :param batch_wait_seconds: how long the first job of a batch waits for more.
    """

    def __init__(self, *, max_batch_size: int = 64, batch_wait_seconds: float = 0.002) -> None:
        self.max_batch_size = max_batch_size
        self.batch_wait_seconds = batch_wait_seconds
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="mopd-device", daemon=True)
        self._thread.start()
        self.waiting = 0
        """Jobs queued and not yet started."""
        self.running = 0
        """Jobs in the batch that runs now."""

    async def submit(self, *, key: Hashable | None, run: BatchFn, payload: Any, size: int = 1) -> Any:
        """Queue ``payload`` for ``run`` and wait for its result.

        ``run`` receives the payloads of one batch and returns one result per
        payload, in order. Cancelling the caller drops its result, never the
        batch.
        """
        if self._closed:
            raise RuntimeError("the local device executor is closed; the backend was shut down")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.waiting += 1
        self._queue.put(_Job(key=key, run=run, payload=payload, size=size, loop=loop, future=future))
        return await future

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` alone on the device thread and return its result."""
        return await self.submit(key=None, run=lambda payloads: [fn()], payload=None)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    async def aclose(self, timeout: float = 60.0) -> None:
        """Close and wait for the device thread to finish its batch: a torch call
        still running while the interpreter shuts down aborts the process."""
        self.close()
        await anyio.to_thread.run_sync(self.join, timeout)

    # --- worker thread ---------------------------------------------------------

    def _work(self) -> None:
        held: list[_Job] = []
        while True:
            first = held.pop(0) if held else self._queue.get()
            if first is None:
                return

            # Collect jobs that batch with the first one; keep the others for later.
            batch = [first]
            size = first.size
            if first.key is not None:
                deadline = time.monotonic() + self.batch_wait_seconds
                for job in list(held):
                    if job.key == first.key and size + job.size <= self.max_batch_size:
                        held.remove(job)
                        batch.append(job)
                        size += job.size
                while size < self.max_batch_size:
                    remaining = deadline - time.monotonic()
                    try:
                        job = self._queue.get(timeout=max(remaining, 0.0)) if remaining > 0 else self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is None:
                        self._queue.put(None)
                        break
                    if job.key == first.key and size + job.size <= self.max_batch_size:
                        batch.append(job)
                        size += job.size
                    else:
                        held.append(job)

            self.waiting -= len(batch)
            self.running = len(batch)
            self._run_batch(batch)
            self.running = 0

    def _run_batch(self, batch: list[_Job]) -> None:
        try:
            results = batch[0].run([job.payload for job in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch function returned {len(results)} results for {len(batch)} jobs")
        except BaseException as exc:  # noqa: BLE001 - the error travels to every caller
            for job in batch:
                _resolve(job, _set_exception, exc)
            return
        for job, result in zip(batch, results, strict=True):
            _resolve(job, _set_result, result)


def _resolve(job: _Job, setter: Callable[[asyncio.Future[Any], Any], None], value: Any) -> None:
    try:
        job.loop.call_soon_threadsafe(setter, job.future, value)
    except RuntimeError:
        # The caller's event loop has closed, so no caller waits for this result.
        pass


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
