"""Resume cursor, checkpoint commits and exactly-once training across restarts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import anyio
import orjson
import pytest
from transformers import AutoTokenizer

from fakes import OracleTeacher, RecordingSampler, RecordingTrainer
from mopd.app import restored_state
from mopd.backends.base import SamplingParams
from mopd.concurrency import FixedWindow
from mopd.errors import StageError
from mopd.metrics import Metrics
from mopd.pipeline.checkpoint import StateStore
from mopd.pipeline.progress import ProgressTracker
from mopd.pipeline.reader import DeadLetterFile, RejectsFile, RouteTable, read_rows
from mopd.pipeline.service import PipelineConfig, run_pipeline
from mopd.pipeline.submitter import Checkpointer
from mopd.tokenization import PromptRenderer
from mopd.types import Row

ROUTES = RouteTable(route_key="teacher",
                    messages_key_by_route={"math-teacher": "teacher_messages", "arithmetic-teacher": "teacher_messages"})
USER = [{"role": "user", "content": "Solve 2 + 3."}]


def good_line(i: int) -> bytes:
    route = ("math-teacher", "arithmetic-teacher")[i % 2]
    return orjson.dumps({"messages": [{"role": "user", "content": f"Solve {i} + 1."}], "teacher": route})


def write_input(path: Path, count: int, *, bad_every: int = 7) -> tuple[set[str], set[str]]:
    """Write ``count`` lines, every ``bad_every``-th one invalid JSON; return the good and bad row ids."""
    lines, good, bad = [], set(), set()
    for number in range(1, count + 1):
        if number % bad_every == 0:
            lines.append(b"{broken")
            bad.add(f"{path}:{number}")
        else:
            lines.append(good_line(number))
            good.add(f"{path}:{number}")
    path.write_bytes(b"\n".join(lines) + b"\n")
    return good, bad


# --- the tracker ---------------------------------------------------------------------


def test_watermark_advances_over_out_of_order_lines() -> None:
    tracker = ProgressTracker()
    tracker.finish(epoch=0, source="a", line_number=2, end_offset=20)
    tracker.finish(epoch=0, source="a", line_number=4, end_offset=40)
    assert tracker.resume_point(epoch=0, source="a") == (0, 0)

    tracker.finish(epoch=0, source="a", line_number=1, end_offset=10)

    assert tracker.resume_point(epoch=0, source="a") == (2, 20)
    assert tracker.is_finished(epoch=0, source="a", line_number=4)
    assert not tracker.is_finished(epoch=0, source="a", line_number=3)


def test_cursor_round_trips_through_json() -> None:
    tracker = ProgressTracker()
    for line in (1, 2, 5, 9):
        tracker.finish(epoch=1, source="a", line_number=line, end_offset=line * 10)

    again = ProgressTracker.from_cursor(orjson.loads(orjson.dumps(tracker.to_cursor())))

    assert again.resume_point(epoch=1, source="a") == (2, 20)
    assert again.is_finished(epoch=1, source="a", line_number=9)
    assert not again.is_finished(epoch=1, source="a", line_number=3)
    assert again.to_cursor() == tracker.to_cursor()


def test_epoch_completes_once_every_line_ended() -> None:
    tracker = ProgressTracker()
    tracker.finish(epoch=0, source="a", line_number=1, end_offset=10)
    tracker.source_read(epoch=0, source="a", last_line=2)
    tracker.epoch_read(epoch=0, sources=["a"])
    assert tracker.completed_epochs == 0

    tracker.finish(epoch=0, source="a", line_number=2, end_offset=20)

    assert tracker.completed_epochs == 1
    assert tracker.to_cursor()["sources"] == []


async def test_reader_skips_lines_ended_before_restart(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"".join(good_line(i) + b"\n" for i in range(1, 7)))
    offsets = [len(b"".join(good_line(i) + b"\n" for i in range(1, n + 1))) for n in range(1, 7)]
    tracker = ProgressTracker()
    for line in (1, 2, 5):
        tracker.finish(epoch=0, source=str(path), line_number=line, end_offset=offsets[line - 1])
    tracker = ProgressTracker.from_cursor(tracker.to_cursor())

    metrics = Metrics()
    rejects = RejectsFile(tmp_path / "rejects.jsonl", metrics, progress=tracker)
    send, receive = anyio.create_memory_object_stream[Row](100)
    await read_rows(send, sources=[path], routes=ROUTES, rejects=rejects, metrics=metrics, stop=anyio.Event(),
                    progress=tracker)
    rejects.close()
    async with receive:
        rows = [row async for row in receive]

    assert [row.line_number for row in rows] == [3, 4, 6]
    assert [row.end_offset for row in rows] == [offsets[2], offsets[3], offsets[5]]


# --- commits and restarts through the pipeline -----------------------------------------


@pytest.fixture
def renderer(tiny_models: Path) -> PromptRenderer:
    return PromptRenderer(AutoTokenizer.from_pretrained(tiny_models / "tokenizer"))


class CrashingTrainer(RecordingTrainer):
    """Raises on step ``crash_at``, as a process killed in the middle of that step."""

    crash_at: int = 0

    async def train_step(self, datums, loss_fn):  # noqa: ANN001, ANN201 - the Trainer protocol
        if self.crash_at and len(self.steps) + 1 == self.crash_at:
            raise RuntimeError("killed")
        return await super().train_step(datums, loss_fn)


async def run_life(state_dir: Path, data: Path, renderer: PromptRenderer, *, crash_at: int = 0,
                   every_steps: int = 1, epochs: int = 1) -> None:
    """Start the pipeline the way the service does: cut the logs back, restore, run."""
    store = StateStore(state_dir)
    checkpoint = store.load()
    paths = {"steps": state_dir / "steps.jsonl", "rejects": state_dir / "rejects.jsonl",
             "dead_letters": state_dir / "dead_letters.jsonl"}
    StateStore.truncate_logs(paths, checkpoint.log_lengths if checkpoint else {})
    progress = ProgressTracker.from_cursor(checkpoint.cursor) if checkpoint else ProgressTracker()

    metrics = Metrics()
    sampler = RecordingSampler()
    trainer = CrashingTrainer(sampler=sampler)
    trainer.crash_at = crash_at
    rejects = RejectsFile(paths["rejects"], metrics, progress=progress)
    dead_letters = DeadLetterFile(paths["dead_letters"], metrics, progress=progress)
    store.logs = {"steps": paths["steps"], "rejects": rejects.log, "dead_letters": dead_letters.log}
    checkpoint = await store.restore(trainer)
    state = restored_state(checkpoint, paths["steps"], rejects=rejects, dead_letters=dead_letters)
    checkpointer = Checkpointer(store=store, trainer=trainer, progress=progress, metrics=metrics, rejects=rejects,
                                dead_letters=dead_letters, every_steps=every_steps)
    config = PipelineConfig(
        sources=[data], routes=ROUTES, workers_by_route={route: 2 for route in ROUTES.messages_key_by_route},
        sampling=SamplingParams(n=2, max_tokens=8), groups_per_step=4, steps_path=paths["steps"], epochs=epochs,
    )
    teachers = {route: OracleTeacher(name=route) for route in ROUTES.messages_key_by_route}
    try:
        with anyio.fail_after(30):
            await run_pipeline(config, sampler=sampler, scorers=teachers, trainer=trainer, renderer=renderer,
                               controller=FixedWindow(4), rejects=rejects, metrics=metrics, stop=anyio.Event(),
                               dead_letters=dead_letters, progress=progress, checkpointer=checkpointer,
                               initial_state=state)
    finally:
        rejects.close()
        dead_letters.close()


def ended_rows(state_dir: Path) -> tuple[Counter[str], Counter[str]]:
    steps = [orjson.loads(x) for x in (state_dir / "steps.jsonl").read_bytes().splitlines()]
    rejects = [orjson.loads(x) for x in (state_dir / "rejects.jsonl").read_bytes().splitlines()]
    return Counter(i for step in steps for i in step["row_ids"]), Counter(r["row_id"] for r in rejects)


def assert_each_row_ended_once(state_dir: Path, good: set[str], bad: set[str]) -> None:
    trained, rejected = ended_rows(state_dir)
    assert set(trained) == good
    assert max(trained.values()) == 1
    assert set(rejected) == bad
    assert max(rejected.values()) == 1


async def test_crash_between_checkpoints_retrains_only_uncommitted_rows(
    tmp_path: Path, renderer: PromptRenderer
) -> None:
    data = tmp_path / "rows.jsonl"
    good, bad = write_input(data, 60)
    state_dir = tmp_path / "state"

    # 1. Crash in step 4 with commits every 2 steps: step 3 trained but was not checkpointed.
    with pytest.raises(StageError, match="killed"):
        await run_life(state_dir, data, renderer, crash_at=4, every_steps=2)
    trained_before, _ = ended_rows(state_dir)
    assert sum(trained_before.values()) == 12
    assert orjson.loads((state_dir / "checkpoint.json").read_bytes())["step"] == 2

    # 2. Restart and run to the end of the input.
    await run_life(state_dir, data, renderer)

    assert_each_row_ended_once(state_dir, good, bad)
    checkpoint = orjson.loads((state_dir / "checkpoint.json").read_bytes())
    assert checkpoint["counters"]["rows_trained"] == len(good)
    assert checkpoint["counters"]["rows_rejected"] == len(bad)
    assert checkpoint["cursor"]["completed_epochs"] == 1


async def test_restart_after_finished_run_trains_nothing(tmp_path: Path, renderer: PromptRenderer) -> None:
    data = tmp_path / "rows.jsonl"
    good, _ = write_input(data, 20)
    state_dir = tmp_path / "state"
    await run_life(state_dir, data, renderer)
    first = (state_dir / "steps.jsonl").read_bytes()

    await run_life(state_dir, data, renderer)

    assert (state_dir / "steps.jsonl").read_bytes() == first
    trained, _ = ended_rows(state_dir)
    assert set(trained) == good


async def test_lines_after_last_commit_are_cut_on_restart(tmp_path: Path, renderer: PromptRenderer) -> None:
    data = tmp_path / "rows.jsonl"
    good, bad = write_input(data, 30)
    state_dir = tmp_path / "state"
    with pytest.raises(StageError):
        await run_life(state_dir, data, renderer, crash_at=3)
    # A step record and a reject written after the last commit, then a torn line.
    with (state_dir / "steps.jsonl").open("ab") as handle:
        handle.write(orjson.dumps({"step": 99, "row_ids": sorted(good)[:4]}) + b"\n" + b'{"step": 10')
    with (state_dir / "rejects.jsonl").open("ab") as handle:
        handle.write(orjson.dumps({"row_id": sorted(bad)[0], "reason": "invalid_json"}) + b"\n")

    await run_life(state_dir, data, renderer)

    assert_each_row_ended_once(state_dir, good, bad)


async def test_epoch_count_survives_restart(tmp_path: Path, renderer: PromptRenderer) -> None:
    data = tmp_path / "rows.jsonl"
    good, bad = write_input(data, 14)
    state_dir = tmp_path / "state"

    # 12 good rows a pass, 4 per step: step 5 is in the second epoch.
    with pytest.raises(StageError):
        await run_life(state_dir, data, renderer, crash_at=5, epochs=3)
    assert orjson.loads((state_dir / "checkpoint.json").read_bytes())["cursor"]["completed_epochs"] == 1

    await run_life(state_dir, data, renderer, epochs=3)

    steps = [orjson.loads(x) for x in (state_dir / "steps.jsonl").read_bytes().splitlines()]
    trained = Counter((i, e) for step in steps for i, e in zip(step["row_ids"], step["row_epochs"], strict=True))
    assert set(trained) == {(i, e) for i in good for e in range(3)}
    assert max(trained.values()) == 1
    _, rejected = ended_rows(state_dir)
    assert rejected == Counter(bad)
    assert orjson.loads((state_dir / "checkpoint.json").read_bytes())["cursor"]["completed_epochs"] == 3


def test_corrupt_checkpoint_stops_start_up_with_message(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.json").write_text("{not json")
    from mopd.errors import ConfigError

    with pytest.raises(ConfigError, match="is not a valid checkpoint"):
        StateStore(tmp_path).load()
