"""Pipeline overhead on real time with instant backends.

    python bench/overhead.py tokens   completion tokens/s through all five stages
    python bench/overhead.py rss      resident memory growth from 10,000 to 1,000,000 rows

Each prints one JSON object. The process pins itself to one CPU core first.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import anyio
import orjson

from mopd.backends.base import SamplingParams
from mopd.concurrency import FixedWindow
from mopd.logging import configure_logging
from mopd.metrics import Metrics
from mopd.pipeline.reader import RejectsFile, RouteTable
from mopd.pipeline.service import PipelineConfig, run_pipeline
from mopd.sim import InstantSampler, InstantScorer, InstantTrainer, SimRenderer, write_rows

ROUTES = ("math-teacher", "arithmetic-teacher")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _run(*, rows: int, epochs: int, n: int, tokens: int, groups_per_step: int,
               on_rows_read: tuple[int, list[int]] | None = None) -> dict[str, float]:
    metrics = Metrics()
    sampler = InstantSampler()
    trainer = InstantTrainer(sampler)
    with tempfile.TemporaryDirectory(prefix="mopd-overhead-") as tmp:
        data = write_rows(Path(tmp) / "rows.jsonl", rows=rows, routes=ROUTES)
        config = PipelineConfig(
            sources=[data],
            routes=RouteTable(route_key="teacher", messages_key_by_route={r: "teacher_messages" for r in ROUTES}),
            workers_by_route={r: 4 for r in ROUTES},
            sampling=SamplingParams(n=n, max_tokens=tokens),
            groups_per_step=groups_per_step,
            epochs=epochs,
            queue_size=64,
            route_queue_size=32,
        )
        rejects = RejectsFile(Path(tmp) / "rejects.jsonl", metrics)
        stop = anyio.Event()

        async def watch_rows() -> None:
            # Sample resident memory once the first ``threshold`` rows were read.
            threshold, out = on_rows_read
            while metrics.value("mopd_rows_read_total") < threshold:
                await anyio.sleep(0.01)
            out.append(_rss_bytes())

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            if on_rows_read is not None:
                tg.start_soon(watch_rows)
            result = await run_pipeline(
                config, sampler=sampler, scorers={r: InstantScorer(r) for r in ROUTES}, trainer=trainer,
                renderer=SimRenderer(), controller=FixedWindow(4 * groups_per_step, metrics=metrics),
                rejects=rejects, metrics=metrics, stop=stop,
            )
        seconds = time.perf_counter() - started
        rejects.close()
    tokens_trained = sum(sum(history.tokens) for history in result.state.routes.values())
    return {"seconds": seconds, "rows_trained": result.state.rows_trained, "tokens": tokens_trained,
            "rows_rejected": result.rows_rejected}


def main() -> None:
    configure_logging(level="error", fmt="json")
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    mode = sys.argv[1]
    if mode == "tokens":
        run = anyio.run(lambda: _run(rows=4000, epochs=1, n=4, tokens=256, groups_per_step=64))
        out = {"overhead_tokens_per_s": run["tokens"] / run["seconds"], **run}
    elif mode == "rss":
        rss: list[int] = []
        rows = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
        run = anyio.run(lambda: _run(rows=10_000, epochs=rows // 10_000, n=1, tokens=16, groups_per_step=64,
                                     on_rows_read=(10_000, rss)))
        out = {"rss_growth_mb": (_rss_bytes() - rss[0]) / 2**20, "rss_at_10k_mb": rss[0] / 2**20,
               "rows_per_s": run["rows_trained"] / run["seconds"], **run}
    else:
        raise SystemExit(f"unknown mode {mode!r}; use tokens or rss")
    print(orjson.dumps(out).decode())


if __name__ == "__main__":
    main()
