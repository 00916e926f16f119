"""Follow mode: appends, a partial last line, rotation by rename, a directory, resume after a restart."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import orjson

from mopd.metrics import Metrics
from mopd.pipeline.follow import FollowConfig, follow_rows
from mopd.pipeline.progress import ProgressTracker
from mopd.pipeline.reader import RejectsFile, RouteTable
from mopd.types import Row

ROUTES = RouteTable(route_key="teacher", messages_key_by_route={"math-teacher": "teacher_messages"})
POLL = 0.02


def line(i: int) -> bytes:
    return orjson.dumps({"messages": [{"role": "user", "content": f"Solve {i} + 1."}], "teacher": "math-teacher"})


class Follower:
    """Runs follow_rows in the background and collects what it sends."""

    def __init__(self, path: Path, tmp_path: Path, progress: ProgressTracker | None = None) -> None:
        self.config = FollowConfig(path=str(path), poll_seconds=POLL)
        self.metrics = Metrics()
        self.progress = progress
        self.rejects = RejectsFile(tmp_path / "rejects.jsonl", self.metrics, progress=progress)
        self.rows: list[Row] = []
        self.stop = anyio.Event()

    async def run(self) -> None:
        send, receive = anyio.create_memory_object_stream[Row](1000)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._collect, receive)
            await follow_rows(send, follow=self.config, routes=ROUTES, rejects=self.rejects, metrics=self.metrics,
                              stop=self.stop, progress=self.progress)
        self.rejects.close()

    async def _collect(self, receive) -> None:  # noqa: ANN001 - a memory object receive stream
        async with receive:
            async for row in receive:
                self.rows.append(row)
                if self.progress is not None:
                    self.progress.finish(epoch=row.epoch, source=row.source, line_number=row.line_number,
                                         end_offset=row.end_offset)

    async def wait_for(self, count: int) -> None:
        with anyio.fail_after(5):
            while len(self.rows) < count:
                await anyio.sleep(POLL)

    def rejected(self) -> list[dict]:
        path = self.rejects.path
        return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


async def test_appends_and_partial_line_are_read_once_complete(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(line(1) + b"\n")
    follower = Follower(path, tmp_path)
    async with anyio.create_task_group() as tg:
        tg.start_soon(follower.run)
        await follower.wait_for(1)

        # Half a line, then the rest of it with another line.
        second = line(2)
        with path.open("ab") as handle:
            handle.write(second[:10])
        await anyio.sleep(POLL * 5)
        assert len(follower.rows) == 1
        with path.open("ab") as handle:
            handle.write(second[10:] + b"\r\n" + line(3) + b"\n")
        await follower.wait_for(3)
        follower.stop.set()

    inode = path.stat().st_ino
    assert [row.row_id for row in follower.rows] == [f"{path}@{inode}:{n}" for n in (1, 2, 3)]
    assert follower.rejected() == []


async def test_rotation_reads_old_file_to_end(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(line(1) + b"\n")
    old_inode = path.stat().st_ino
    follower = Follower(path, tmp_path)
    async with anyio.create_task_group() as tg:
        tg.start_soon(follower.run)
        await follower.wait_for(1)

        # The writer appends a last line without newline, renames the file and starts a new one.
        with path.open("ab") as handle:
            handle.write(line(2) + b"\n" + line(3))
        os.rename(path, tmp_path / "rows.jsonl.1")
        path.write_bytes(line(4) + b"\n")
        new_inode = path.stat().st_ino
        await follower.wait_for(4)
        follower.stop.set()

    ids = sorted(row.row_id for row in follower.rows)
    assert ids == sorted([f"{path}@{old_inode}:1", f"{path}@{old_inode}:2", f"{path}@{old_inode}:3",
                          f"{path}@{new_inode}:1"])


async def test_directory_picks_up_new_files(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(line(1) + b"\n{bad\n")
    follower = Follower(tmp_path / "in", tmp_path)
    async with anyio.create_task_group() as tg:
        tg.start_soon(follower.run)
        await follower.wait_for(1)
        (tmp_path / "in" / "b.jsonl").write_bytes(line(2) + b"\n")
        (tmp_path / "in" / "ignored.txt").write_bytes(line(3) + b"\n")
        await follower.wait_for(2)
        await anyio.sleep(POLL * 5)
        follower.stop.set()

    assert sorted(row.line_number for row in follower.rows) == [1, 1]
    assert {Path(row.source.rsplit("@", 1)[0]).name for row in follower.rows} == {"a.jsonl", "b.jsonl"}
    assert [r["reason"] for r in follower.rejected()] == ["invalid_json"]


async def test_restart_resumes_after_ended_lines(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"".join(line(i) + b"\n" for i in range(1, 4)))
    progress = ProgressTracker()
    first = Follower(path, tmp_path, progress)
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.run)
        await first.wait_for(3)
        first.stop.set()

    # After a restart with the committed cursor, only new lines arrive.
    with path.open("ab") as handle:
        handle.write(line(4) + b"\n")
    second = Follower(path, tmp_path, ProgressTracker.from_cursor(progress.to_cursor()))
    async with anyio.create_task_group() as tg:
        tg.start_soon(second.run)
        await second.wait_for(1)
        await anyio.sleep(POLL * 5)
        second.stop.set()

    assert [row.line_number for row in second.rows] == [4]


async def test_oversized_line_in_pieces_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"")
    follower = Follower(path, tmp_path)
    follower.config = FollowConfig(path=str(path), poll_seconds=POLL)
    async with anyio.create_task_group() as tg:
        tg.start_soon(follower.run)
        with path.open("ab") as handle:
            for _ in range(40):
                handle.write(b"x" * 50_000)
                handle.flush()
            handle.write(b"\n" + line(2) + b"\n")
        await follower.wait_for(1)
        follower.stop.set()

    assert [row.line_number for row in follower.rows] == [2]
    rejected = follower.rejected()
    assert [r["reason"] for r in rejected] == ["line_too_long"]
    assert len(rejected[0]["line"]) == 1 << 20


async def test_pipeline_trains_rows_appended_while_following(tiny_models: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from fakes import OracleTeacher, RecordingSampler, RecordingTrainer
    from mopd.backends.base import SamplingParams
    from mopd.concurrency import FixedWindow
    from mopd.pipeline.reader import DeadLetterFile
    from mopd.pipeline.resilience import ResiliencePolicy
    from mopd.pipeline.service import PipelineConfig, run_pipeline
    from mopd.tokenization import PromptRenderer

    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"".join(line(i) + b"\n" for i in range(4)))
    metrics = Metrics()
    rejects = RejectsFile(tmp_path / "rejects.jsonl", metrics)
    dead_letters = DeadLetterFile(tmp_path / "dead_letters.jsonl", metrics)
    sampler = RecordingSampler()
    config = PipelineConfig(
        sources=[], routes=ROUTES, workers_by_route={"math-teacher": 2}, sampling=SamplingParams(n=2, max_tokens=8),
        groups_per_step=2, steps_path=tmp_path / "steps.jsonl", follow=FollowConfig(path=str(path), poll_seconds=POLL),
        resilience=ResiliencePolicy(dead_letter_seconds=10.0),
    )
    stop = anyio.Event()

    async def append_then_stop() -> None:
        await anyio.sleep(0.3)
        with path.open("ab") as handle:
            handle.write(b"".join(line(i) + b"\n" for i in range(4, 8)))
        with anyio.fail_after(10):
            while (tmp_path / "steps.jsonl").read_bytes().count(b"\n") < 4:
                await anyio.sleep(POLL)
        stop.set()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(append_then_stop)
            result = await run_pipeline(
                config, sampler=sampler, scorers={"math-teacher": OracleTeacher(name="math-teacher")},
                trainer=RecordingTrainer(sampler=sampler),
                renderer=PromptRenderer(AutoTokenizer.from_pretrained(tiny_models / "tokenizer")),
                controller=FixedWindow(4), rejects=rejects, metrics=metrics, stop=stop, dead_letters=dead_letters,
            )
    rejects.close()
    dead_letters.close()

    trained = [i for x in (tmp_path / "steps.jsonl").read_bytes().splitlines() for i in orjson.loads(x)["row_ids"]]
    inode = path.stat().st_ino
    assert sorted(trained) == sorted(f"{path}@{inode}:{n}" for n in range(1, 9))
    assert result.stopped_by == "signal"
