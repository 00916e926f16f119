"""Stage 1 in follow mode: tail growing JSONL files until a stop request.

``MOPD_FOLLOW=true`` makes ``MOPD_DATA_PATH`` name a file, a directory (its
``*.jsonl`` files) or a glob that is polled every ``MOPD_FOLLOW_POLL_SECONDS``:

1. Appends are read as they arrive. A last line without its newline is kept
   back until the newline comes, so a writer that is in the middle of a line
   never produces a reject.
2. A file is known by its inode, so its rows keep their ids when it is
   renamed. The source of a row is ``<path>@<inode>``, where path is where the
   file was first seen, and its id is ``<path>@<inode>:<line>``.
3. Rotation by rename: when the path names another file (or none), the old
   file is read to its end, its unterminated last line is taken as a line,
   and the file is closed once it stayed unchanged for two polls. The new
   file at the path is read from its start.
4. After a restart, each file resumes at the low-watermark offset of the
   resume cursor, and lines that ended above it are skipped.

NOTE: a file truncated in place (copytruncate rotation) or a new file that
reuses the inode of a removed one is taken for the old file, so its first
lines are skipped as already read. Rotate by rename.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import anyio
import structlog
from anyio.abc import ObjectSendStream

from mopd.metrics import Metrics
from mopd.pipeline.progress import ProgressTracker
from mopd.pipeline.reader import RejectsFile, RouteTable, handle_line
from mopd.types import Row

log = structlog.get_logger(__name__)

READ_CHUNK_BYTES = 1 << 16
IDLE_POLLS_BEFORE_CLOSE = 2
"""Polls without new data after which a rotated-away file is closed."""


@dataclass(frozen=True)
class FollowConfig:
    """Input location and poll interval of follow mode."""

    path: str
    """A file, a directory (its ``*.jsonl`` files) or a glob pattern."""
    poll_seconds: float = 0.5


@dataclass
class _Tail:
    """One open file being followed."""

    source: str
    path: Path
    inode: int
    handle: BinaryIO
    line_number: int
    offset: int
    """Byte offset just after the last complete line read."""
    pending: bytearray = field(default_factory=bytearray)
    """Start of a line whose newline has not arrived yet (at most max_line_bytes + 1 bytes)."""
    pending_bytes: int = 0
    """Bytes of that line read so far, including those not kept in ``pending``."""
    oversized: bool = False
    """True while the rest of an oversized line is being skipped."""
    rotated: bool = False
    idle_polls: int = 0


def _candidates(pattern: str) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        return sorted(p for p in path.glob("*.jsonl") if p.is_file())
    if any(ch in pattern for ch in "*?["):
        return sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    return [path] if path.is_file() else []


def _split(tail: _Tail, data: bytes, max_line_bytes: int) -> list[tuple[int, bytes, bool, int]]:
    """Cut new bytes into complete lines: (line number, bytes without ending, too long, end offset)."""
    lines = []
    start = 0
    while True:
        newline = data.find(b"\n", start)
        piece = data[start:] if newline < 0 else data[start:newline + 1]
        if newline < 0:
            # No newline yet: keep the start of the line, bounded.
            if not tail.oversized:
                room = max_line_bytes + 1 - len(tail.pending)
                tail.pending += piece[:max(room, 0)]
                if len(tail.pending) > max_line_bytes:
                    tail.oversized = True
            tail.pending_bytes += len(piece)
            return lines
        consumed = tail.pending_bytes + len(piece)
        tail.pending_bytes = 0
        tail.line_number += 1
        tail.offset += consumed
        if tail.oversized:
            lines.append((tail.line_number, bytes(tail.pending[:max_line_bytes]), True, tail.offset))
        else:
            whole = bytes(tail.pending) + piece
            if len(whole) > max_line_bytes and len(whole.rstrip(b"\r\n")) > max_line_bytes:
                lines.append((tail.line_number, whole[:max_line_bytes], True, tail.offset))
            else:
                lines.append((tail.line_number, whole.rstrip(b"\r\n"), False, tail.offset))
        tail.pending.clear()
        tail.oversized = False
        start = newline + 1
        if start >= len(data):
            return lines


def _flush_unterminated(tail: _Tail, max_line_bytes: int) -> list[tuple[int, bytes, bool, int]]:
    """Take the unterminated last line of a file that is being closed as a line."""
    if not tail.pending_bytes:
        return []
    tail.line_number += 1
    tail.offset += tail.pending_bytes
    tail.pending_bytes = 0
    line = (tail.line_number, bytes(tail.pending[:max_line_bytes]), tail.oversized, tail.offset)
    tail.pending.clear()
    tail.oversized = False
    return [line]


class _Follower:
    """The open tails and the files already finished, by inode."""

    def __init__(self, config: FollowConfig, progress: ProgressTracker | None) -> None:
        self.config = config
        self.progress = progress
        self.tails: dict[int, _Tail] = {}
        self.closed: set[int] = set()
        # Sources in the cursor, by inode, so a renamed file keeps its row ids after a restart.
        self.known: dict[int, str] = {}
        if progress is not None:
            for entry in progress.to_cursor()["sources"]:
                name = entry["source"]
                _, _, inode = name.rpartition("@")
                if inode.isdigit():
                    self.known[int(inode)] = name

    def discover(self) -> None:
        """Open every new file that matches; note files whose path now names another inode."""
        seen_at: dict[Path, int] = {}
        for path in _candidates(self.config.path):
            try:
                inode = path.stat().st_ino
            except FileNotFoundError:
                continue
            seen_at[path] = inode
            if inode in self.tails or inode in self.closed:
                continue
            self._open(path, inode)
        for tail in self.tails.values():
            if seen_at.get(tail.path) != tail.inode and not tail.rotated:
                tail.rotated = True
                log.info("follow_file_rotated", source=tail.source, path=str(tail.path))

    def _open(self, path: Path, inode: int) -> None:
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            return
        if os.fstat(handle.fileno()).st_ino != inode:
            handle.close()
            return
        source = self.known.get(inode) or f"{path}@{inode}"
        line_number, offset = 0, 0
        if self.progress is not None:
            line_number, offset = self.progress.resume_point(epoch=0, source=source)
        handle.seek(offset)
        self.tails[inode] = _Tail(source=source, path=path, inode=inode, handle=handle, line_number=line_number,
                                  offset=offset)
        log.info("follow_file_opened", source=source, path=str(path), line_number=line_number, offset=offset)

    def close(self, tail: _Tail) -> None:
        tail.handle.close()
        del self.tails[tail.inode]
        self.closed.add(tail.inode)
        if self.progress is not None:
            self.progress.source_read(epoch=0, source=tail.source, last_line=tail.line_number)
        log.info("follow_file_closed", source=tail.source, lines=tail.line_number)

    def close_all(self) -> None:
        for tail in list(self.tails.values()):
            tail.handle.close()
        self.tails.clear()


async def follow_rows(
    send_rows: ObjectSendStream[Row],
    *,
    follow: FollowConfig,
    routes: RouteTable,
    rejects: RejectsFile,
    metrics: Metrics,
    stop: anyio.Event,
    max_line_bytes: int = 1 << 20,
    progress: ProgressTracker | None = None,
) -> None:
    """Stage 1 in follow mode: send rows as lines are appended, until ``stop`` is set."""
    follower = _Follower(follow, progress)
    try:
        async with send_rows:
            while not stop.is_set():
                # 1. Pick up new and rotated files.
                follower.discover()

                # 2. Read what each file gained; close rotated files that went quiet.
                got_data = False
                for tail in list(follower.tails.values()):
                    data = tail.handle.read(READ_CHUNK_BYTES)
                    lines = _split(tail, data, max_line_bytes) if data else []
                    if data:
                        got_data = True
                        tail.idle_polls = 0
                    elif tail.rotated:
                        tail.idle_polls += 1
                        if tail.idle_polls >= IDLE_POLLS_BEFORE_CLOSE:
                            lines = _flush_unterminated(tail, max_line_bytes)
                    for line_number, raw, too_long, end_offset in lines:
                        outcome = handle_line(
                            raw, too_long=too_long, source=tail.source, line_number=line_number,
                            end_offset=end_offset, epoch=0, routes=routes, rejects=rejects, metrics=metrics,
                            max_line_bytes=max_line_bytes, progress=progress,
                        )
                        if outcome.row is None:
                            continue
                        try:
                            await send_rows.send(outcome.row)
                        except anyio.BrokenResourceError:
                            log.info("reader_stopped", source=tail.source, line_number=line_number)
                            return
                        if stop.is_set():
                            log.info("reader_stopped", source=tail.source, line_number=line_number)
                            return
                    if tail.rotated and tail.idle_polls >= IDLE_POLLS_BEFORE_CLOSE:
                        follower.close(tail)

                # 3. Nothing new anywhere: wait a poll interval, or until a stop request.
                if not got_data:
                    with anyio.move_on_after(follow.poll_seconds):
                        await stop.wait()
            log.info("reader_stopped", reason="stop requested")
    finally:
        follower.close_all()
