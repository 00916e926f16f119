"""Progress tracking of ended input lines, and the resume cursor built from it.

A line ends when it is trained, rejected, dead-lettered or skipped (a blank
line). Rows finish out of order, because routes and workers run side by side,
so each (epoch, source) keeps

    low_watermark   the highest line number L such that lines 1..L have all ended
    offset          the byte offset just after line L, where a resumed reader seeks
    finished        line number -> end offset, for ended lines above L

The trainer submitter commits a snapshot of this cursor together with the
trainer checkpoint it belongs to (see ``checkpoint.py``). A row counts as
trained in the tracker as soon as its step ran, but the cursor on disk changes
only with a checkpoint. So after a crash, every row whose step was not
checkpointed is read and trained again, and no checkpointed row is.

An epoch is complete once the reader reached the end of every source in it
and every line up to that end has ended. The cursor keeps the number of
complete epochs, so epoch counting survives a restart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class SourceProgress:
    """Ended lines of one source in one epoch."""

    low_watermark: int = 0
    offset: int = 0
    finished: dict[int, int] = field(default_factory=dict)
    """Line number -> byte offset just after it, for ended lines above the watermark."""
    last_line: int | None = None
    """Last line number of the source, once the reader reached its end in this epoch."""

    def finish(self, line_number: int, end_offset: int) -> None:
        if line_number <= self.low_watermark:
            return
        self.finished[line_number] = end_offset
        # Advance over the run of ended lines that now follows the watermark.
        while self.low_watermark + 1 in self.finished:
            self.low_watermark += 1
            self.offset = self.finished.pop(self.low_watermark)

    def is_finished(self, line_number: int) -> bool:
        return line_number <= self.low_watermark or line_number in self.finished

    @property
    def complete(self) -> bool:
        return self.last_line is not None and self.low_watermark >= self.last_line


class ProgressTracker:
    """Ended lines per (epoch, source), and the count of complete epochs."""

    def __init__(self) -> None:
        self.completed_epochs = 0
        """Epochs whose every line has ended; the reader resumes at this epoch."""
        self._progress: dict[tuple[int, str], SourceProgress] = {}
        self._epoch_sources: dict[int, set[str]] = {}
        """Sources of each epoch whose end the reader reached."""

    def progress(self, epoch: int, source: str) -> SourceProgress:
        key = (epoch, source)
        found = self._progress.get(key)
        if found is None:
            found = self._progress[key] = SourceProgress()
        return found

    def finish(self, *, epoch: int, source: str, line_number: int, end_offset: int) -> None:
        """Record that a line ended (trained, rejected, dead-lettered or skipped)."""
        if epoch < self.completed_epochs:
            return
        self.progress(epoch, source).finish(line_number, end_offset)
        self._complete_epochs()

    def is_finished(self, *, epoch: int, source: str, line_number: int) -> bool:
        if epoch < self.completed_epochs:
            return True
        found = self._progress.get((epoch, source))
        return found is not None and found.is_finished(line_number)

    def source_read(self, *, epoch: int, source: str, last_line: int) -> None:
        """Record that the reader reached the end of ``source`` in ``epoch``."""
        self.progress(epoch, source).last_line = last_line

    def epoch_read(self, *, epoch: int, sources: list[str]) -> None:
        """Record that the reader reached the end of every source of ``epoch``."""
        self._epoch_sources[epoch] = set(sources)
        self._complete_epochs()

    def _complete_epochs(self) -> None:
        while True:
            epoch = self.completed_epochs
            sources = self._epoch_sources.get(epoch)
            if sources is None:
                return
            if not all(self._progress.get((epoch, s), SourceProgress(last_line=0)).complete for s in sources):
                return
            for key in [key for key in self._progress if key[0] == epoch]:
                del self._progress[key]
            del self._epoch_sources[epoch]
            self.completed_epochs += 1

    # --- the cursor on disk ------------------------------------------------------

    def to_cursor(self) -> dict[str, Any]:
        """Snapshot as a JSON-ready resume cursor."""
        return {
            "completed_epochs": self.completed_epochs,
            "sources": [
                {
                    "epoch": epoch,
                    "source": source,
                    "low_watermark": p.low_watermark,
                    "offset": p.offset,
                    "finished": sorted([line, offset] for line, offset in p.finished.items()),
                }
                for (epoch, source), p in sorted(self._progress.items())
                if p.low_watermark or p.finished
            ],
        }

    @classmethod
    def from_cursor(cls, cursor: Mapping[str, Any]) -> ProgressTracker:
        """Rebuild a tracker from :meth:`to_cursor` output."""
        tracker = cls()
        tracker.completed_epochs = int(cursor.get("completed_epochs", 0))
        for entry in cursor.get("sources", []):
            progress = tracker.progress(int(entry["epoch"]), str(entry["source"]))
            progress.low_watermark = int(entry["low_watermark"])
            progress.offset = int(entry["offset"])
            progress.finished = {int(line): int(offset) for line, offset in entry.get("finished", [])}
        return tracker

    def resume_point(self, *, epoch: int, source: str) -> tuple[int, int]:
        """Return (line number, byte offset) after which reading ``source`` in ``epoch`` resumes."""
        found = self._progress.get((epoch, source))
        if found is None:
            return 0, 0
        return found.low_watermark, found.offset
