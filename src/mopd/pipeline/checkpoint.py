"""The state directory: trainer checkpoints committed together with the resume cursor.

Layout of ``MOPD_STATE_DIR``:

    checkpoint.json          the last commit: step, policy version, counters,
                             the trainer file, the resume cursor and the
                             committed length of every append-only log
    checkpoints/trainer-<step>.pt   trainer state (weights, optimizer, version, step)
    steps.jsonl              one line per optimizer step, with the trained row ids
    rejects.jsonl            rejected rows with their reason code
    dead_letters.jsonl       rows whose teacher stayed down too long
    summary.json             written when a run ends

Commit protocol (one commit after every ``MOPD_CHECKPOINT_EVERY_STEPS`` steps
and one when the run ends):

1. The trainer writes ``checkpoints/trainer-<step>.pt`` to a temporary file,
   which is fsynced and renamed into place. A commit with no new step reuses
   the file of the last one.
2. The append-only logs are flushed and fsynced, and their lengths are read,
   in the same event-loop turn as the cursor snapshot, so no row can end
   between the two.
3. ``checkpoint.json`` is written to a temporary file, fsynced and renamed
   over the old one; the rename is the commit point.
4. Trainer files older than the last ``keep`` commits are removed.

On start, :meth:`StateStore.restore` truncates every log to its committed
length. Lines written after the last commit (a step trained but not
checkpointed, a row rejected after it) vanish, and their rows are read again,
so the logs never show a row twice.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import structlog

from mopd.backends.base import Trainer
from mopd.errors import ConfigError
from mopd.pipeline.progress import ProgressTracker

log = structlog.get_logger(__name__)

CHECKPOINT_FILE = "checkpoint.json"
CHECKPOINT_FORMAT = 1


def fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file: write, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    fsync_directory(path.parent)


class AppendLog:
    """An append-only JSONL file whose committed length is tracked by the checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("ab")

    def append(self, record: dict[str, Any]) -> None:
        self._file.write(orjson.dumps(record, default=str) + b"\n")
        self._file.flush()

    def sync(self) -> int:
        """Fsync the file and return its length in bytes."""
        self._file.flush()
        os.fsync(self._file.fileno())
        return self._file.tell()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


@dataclass(frozen=True)
class Checkpoint:
    """One commit, as stored in ``checkpoint.json``."""

    step: int
    policy_version: int
    trainer_file: str | None
    """Trainer state file relative to the state directory; None before the first save."""
    cursor: dict[str, Any]
    log_lengths: dict[str, int]
    """Log file name -> committed length in bytes."""
    counters: dict[str, int] = field(default_factory=dict)
    """Totals over the whole run: rows_trained, rows_rejected, rows_dead_lettered."""
    committed_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "policy_version": self.policy_version,
            "trainer_file": self.trainer_file,
            "cursor": self.cursor,
            "log_lengths": self.log_lengths,
            "counters": self.counters,
            "committed_at": self.committed_at,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Checkpoint:
        return cls(
            step=int(data["step"]), policy_version=int(data["policy_version"]), trainer_file=data.get("trainer_file"),
            cursor=dict(data["cursor"]), log_lengths={k: int(v) for k, v in data["log_lengths"].items()},
            counters={k: int(v) for k, v in data.get("counters", {}).items()},
            committed_at=float(data.get("committed_at", 0.0)),
        )


class StateStore:
    """Commits and restores the trainer checkpoint, the resume cursor and the log lengths.

    :param logs: the append-only logs whose lengths each commit records, by
        name: an open :class:`AppendLog`, or the path of a file that its writer
        flushes after every line.
    :param keep: trainer files kept on disk (the last ``keep`` commits).
    """

    def __init__(
        self, state_dir: Path, *, logs: dict[str, AppendLog | Path] | None = None, keep: int = 2
    ) -> None:
        self.state_dir = state_dir
        self.logs = dict(logs or {})
        self.keep = max(keep, 1)
        self.last: Checkpoint | None = None
        state_dir.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint_path(self) -> Path:
        return self.state_dir / CHECKPOINT_FILE

    def load(self) -> Checkpoint | None:
        """Read ``checkpoint.json``; None when there is none."""
        path = self.checkpoint_path
        if not path.is_file():
            return None
        try:
            data = orjson.loads(path.read_bytes())
            return Checkpoint.from_json(data)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"{path} is not a valid checkpoint ({exc}); restore it from a backup or point MOPD_STATE_DIR at a "
                "new directory to start the run over"
            ) from exc

    @staticmethod
    def truncate_logs(paths: dict[str, Path], lengths: dict[str, int]) -> dict[str, int]:
        """Cut every log to its committed length (0 when the commit does not name it).

        Call it before the logs are opened. Returns the bytes removed per log name.
        """
        removed = {}
        for name, path in paths.items():
            if not path.is_file():
                continue
            size = path.stat().st_size
            keep = lengths.get(name, 0)
            if size > keep:
                with path.open("r+b") as handle:
                    handle.truncate(keep)
                    handle.flush()
                    os.fsync(handle.fileno())
                removed[name] = size - keep
        return removed

    async def restore(self, trainer: Trainer) -> Checkpoint | None:
        """Load the trainer state of the last commit; the logs must already be truncated."""
        checkpoint = self.load()
        self.last = checkpoint
        if checkpoint is None or checkpoint.trainer_file is None:
            return checkpoint
        path = self.state_dir / checkpoint.trainer_file
        if not path.is_file():
            raise ConfigError(
                f"{self.checkpoint_path} names the trainer state {path}, which is missing; restore the file or "
                "point MOPD_STATE_DIR at a new directory to start the run over"
            )
        await trainer.load_state(path)
        log.info("checkpoint_restored", step=checkpoint.step, policy_version=checkpoint.policy_version,
                 trainer_file=str(path))
        return checkpoint

    async def commit(
        self,
        *,
        trainer: Trainer,
        step: int,
        policy_version: int,
        tracker: ProgressTracker,
        counters: dict[str, int],
    ) -> Checkpoint:
        """Write the trainer state (when ``step`` is new), then commit it with the cursor and the log lengths."""
        started = time.monotonic()

        # 1. Trainer state, unless the last commit already contains this step.
        trainer_file = self.last.trainer_file if self.last is not None else None
        if self.last is None or self.last.step != step or trainer_file is None:
            trainer_file = f"checkpoints/trainer-{step:08d}.pt"
            path = self.state_dir / trainer_file
            await trainer.save_state(path)
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
            fsync_directory(path.parent)

        # 2. Log lengths and the cursor snapshot, with no await in between.
        lengths = {name: _sync_log(append_log) for name, append_log in self.logs.items()}
        checkpoint = Checkpoint(
            step=step, policy_version=policy_version, trainer_file=trainer_file, cursor=tracker.to_cursor(),
            log_lengths=lengths, counters=dict(counters), committed_at=time.time(),
        )

        # 3. The commit point.
        write_atomic(self.checkpoint_path, orjson.dumps(checkpoint.to_json()))
        self.last = checkpoint

        # 4. Older trainer files.
        self._prune(keep_file=trainer_file)
        log.info("checkpoint_committed", step=step, policy_version=policy_version,
                 seconds=round(time.monotonic() - started, 3), epochs_done=tracker.completed_epochs)
        return checkpoint

    def _prune(self, *, keep_file: str) -> None:
        directory = self.state_dir / "checkpoints"
        if not directory.is_dir():
            return
        files = sorted(p for p in directory.glob("trainer-*.pt") if p.is_file())
        current = self.state_dir / keep_file
        old = [p for p in files if p != current]
        for path in old[: max(len(old) - (self.keep - 1), 0)]:
            path.unlink(missing_ok=True)
        for tmp in directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)


def _sync_log(append_log: AppendLog | Path) -> int:
    if isinstance(append_log, AppendLog):
        return append_log.sync()
    if not append_log.is_file():
        return 0
    fd = os.open(append_log, os.O_RDONLY)
    try:
        os.fsync(fd)
        return os.fstat(fd).st_size
    finally:
        os.close(fd)
