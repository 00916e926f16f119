"""Stage 1: read JSONL rows, validate them, reject bad ones with a reason code.

Reason codes written to the rejects file (and the ``reason`` label of
``mopd_rows_rejected_total``):

    line_too_long          the line exceeds MOPD_MAX_LINE_BYTES
    invalid_utf8           the line is not valid UTF-8
    nul_byte               the line contains a NUL byte
    invalid_json           the line is not valid JSON
    not_an_object          the JSON value is not an object
    missing_messages       no "messages" key
    invalid_messages       "messages" is not a list of {"role", "content"} objects
    empty_messages         "messages" is an empty list
    missing_route          routed mode and the route key is absent
    invalid_route          the route value is not a non-empty string
    unknown_route          the route names no configured teacher
    invalid_teacher_messages  the teacher's messages key holds no valid message list
    invalid_expected_answer   "expected_answer" is not a string or number
    invalid_extra_info     "extra_info" is not an object

Blank lines are not rows: they are skipped without a reject. A UTF-8 byte
order mark and CRLF line endings are accepted.
"""

from __future__ import annotations

import glob
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import orjson
import structlog
from anyio.abc import ObjectSendStream

from mopd.errors import ConfigError, InvalidRow
from mopd.metrics import Metrics
from mopd.pipeline.checkpoint import AppendLog
from mopd.pipeline.progress import ProgressTracker
from mopd.types import Messages, Row

log = structlog.get_logger(__name__)

DEFAULT_TEACHER_MESSAGES_KEY = "teacher_messages"
"""Row key of the privileged teacher prompt when a teacher's own key is absent from a row."""
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class RouteTable:
    """Mapping of rows to teachers."""

    route_key: str
    messages_key_by_route: Mapping[str, str]
    """Route value -> row key of that teacher's privileged prompt."""
    single_route: str | None = None
    """Route of the only teacher in single-teacher mode; rows need no route key."""


class RejectsFile:
    """Appends rejected rows as JSON lines; each line keeps the original input.

    Every record contains ``reason``, ``message``, ``source``, ``line_number``,
    ``row_id``, ``epoch`` and the original line: ``line`` when it is valid
    UTF-8, else ``line_escaped`` with the bytes that are not as ``\\xNN``
    escapes. A record ends its row in ``progress`` (the resume cursor).
    """

    event = "row_rejected"

    def __init__(self, path: Path, metrics: Metrics, *, progress: ProgressTracker | None = None) -> None:
        self.path = path
        self._metrics = metrics
        self.progress = progress
        self.log = AppendLog(path)
        self.count = 0

    def write(
        self,
        *,
        reason: str,
        message: str,
        source: str,
        line_number: int,
        raw: bytes | None = None,
        row: Mapping[str, Any] | None = None,
        epoch: int = 0,
        end_offset: int | None = None,
        route: str | None = None,
    ) -> None:
        record: dict[str, Any] = {
            "reason": reason,
            "message": message,
            "source": source,
            "line_number": line_number,
            "row_id": f"{source}:{line_number}",
            "epoch": epoch,
            "rejected_at": time.time(),
        }
        if route is not None:
            record["route"] = route
        if raw is not None:
            try:
                record["line"] = raw.decode("utf-8")
            except UnicodeDecodeError:
                record["line_escaped"] = raw.decode("utf-8", errors="backslashreplace")
        if row is not None:
            record["row"] = row
        self.log.append(record)
        self.count += 1
        self._count(reason=reason, route=route)
        if self.progress is not None and end_offset is not None:
            self.progress.finish(epoch=epoch, source=source, line_number=line_number, end_offset=end_offset)
        log.info(self.event, reason=reason, row_id=record["row_id"], detail=message)

    def write_row(self, row: Row, *, reason: str, message: str) -> None:
        """Write a row that a later stage could not use, with its original line."""
        self.write(
            reason=reason, message=message, source=row.source, line_number=row.line_number,
            raw=None if row.line is None else row.line.encode("utf-8"), epoch=row.epoch,
            end_offset=row.end_offset, route=row.route,
        )

    def _count(self, *, reason: str, route: str | None) -> None:
        self._metrics.rows_rejected.labels(reason=reason).inc()

    def close(self) -> None:
        self.log.close()


class DeadLetterFile(RejectsFile):
    """Appends rows that were valid but could not be trained, such as rows
    whose teacher stayed down longer than ``MOPD_DEAD_LETTER_SECONDS``.

    Same record format as :class:`RejectsFile`; replay the lines once the
    cause is fixed.
    """

    event = "row_dead_lettered"

    def _count(self, *, reason: str, route: str | None) -> None:
        self._metrics.rows_dead_lettered.labels(route=route or "", reason=reason).inc()


def expand_sources(pattern: str) -> list[Path]:
    """Expand a file path or glob into a sorted list of files."""
    if any(ch in pattern for ch in "*?["):
        paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not paths:
            raise ConfigError(f"MOPD_DATA_PATH={pattern!r} matches no file; check the pattern and the working directory")
        return paths
    path = Path(pattern)
    if not path.is_file():
        raise ConfigError(f"MOPD_DATA_PATH={pattern!r} is not a file; point it at a JSONL file or a glob")
    return [path]


def _read_lines(
    handle: BinaryIO, max_line_bytes: int, *, first_line: int = 0, offset: int = 0
) -> Iterator[tuple[int, bytes, bool, int]]:
    """Yield (line number, bytes without the line ending, too long, end offset) per line.

    An oversized line is consumed in bounded chunks so memory stays bounded.
    ``first_line`` and ``offset`` give the line number and byte offset where
    ``handle`` is positioned.
    """
    number = first_line
    while True:
        line = handle.readline(max_line_bytes + 1)
        if not line:
            return
        number += 1
        offset += len(line)
        too_long = len(line) > max_line_bytes and not line.endswith(b"\n")
        if too_long:
            head = line
            while line and not line.endswith(b"\n"):
                line = handle.readline(max_line_bytes + 1)
                offset += len(line)
            yield number, head, True, offset
            continue
        yield number, line.rstrip(b"\r\n"), False, offset


def _messages(value: Any, *, key: str, reason: str) -> Messages:
    if not isinstance(value, list):
        raise InvalidRow(reason, f"{key!r} must be a list of messages, got {type(value).__name__}")
    if not value:
        raise InvalidRow("empty_messages" if key == "messages" else reason, f"{key!r} is an empty list")
    out = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise InvalidRow(reason, f"{key}[{index}] must be an object, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidRow(reason, f"{key}[{index}].role must be one of {sorted(ROLES)}, got {role!r}")
        content = message.get("content")
        if isinstance(content, list):
            # OpenAI content parts: keep the text parts, in order.
            texts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise InvalidRow(reason, f"{key}[{index}].content parts must all be text parts")
            content = "".join(texts)
        if not isinstance(content, str):
            raise InvalidRow(reason, f"{key}[{index}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return tuple(out)


def parse_row(
    raw: bytes, *, source: str, line_number: int, routes: RouteTable, epoch: int = 0, end_offset: int = 0
) -> Row:
    """Validate one line (without its line ending) and build a :class:`Row`.

    :raises InvalidRow: with one of the reason codes in the module docstring.
    """
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
    if b"\x00" in raw:
        raise InvalidRow("nul_byte", "the line contains a NUL byte")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRow("invalid_utf8", f"the line is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRow("invalid_json", f"the line is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRow("not_an_object", f"a row must be a JSON object, got {type(data).__name__}")

    if "messages" not in data:
        raise InvalidRow("missing_messages", "the row has no 'messages' key")
    messages = _messages(data["messages"], key="messages", reason="invalid_messages")

    # Route: single-teacher mode ignores the key; routed mode requires it.
    if routes.single_route is not None:
        route = routes.single_route
    else:
        if routes.route_key not in data:
            raise InvalidRow("missing_route", f"the row has no route key {routes.route_key!r}")
        route = data[routes.route_key]
        if not isinstance(route, str) or not route:
            raise InvalidRow("invalid_route", f"route key {routes.route_key!r} must be a non-empty string, got {route!r}")
        if route not in routes.messages_key_by_route:
            known = ", ".join(sorted(routes.messages_key_by_route))
            raise InvalidRow("unknown_route", f"route {route!r} matches no teacher (configured: {known})")

    # Privileged prompt: the teacher's own key, else the shared key, else none (the student prompt is scored).
    teacher_messages = None
    for teacher_key in dict.fromkeys((routes.messages_key_by_route[route], DEFAULT_TEACHER_MESSAGES_KEY)):
        if data.get(teacher_key) is not None:
            teacher_messages = _messages(data[teacher_key], key=teacher_key, reason="invalid_teacher_messages")
            break

    expected = data.get("expected_answer")
    if expected is not None and (isinstance(expected, bool) or not isinstance(expected, str | int | float)):
        raise InvalidRow("invalid_expected_answer", f"expected_answer must be a string or number, got {expected!r}")
    extra = data.get("extra_info")
    if extra is not None and not isinstance(extra, dict):
        raise InvalidRow("invalid_extra_info", f"extra_info must be an object, got {type(extra).__name__}")

    return Row(
        row_id=f"{source}:{line_number}",
        source=source,
        line_number=line_number,
        route=route,
        messages=messages,
        teacher_messages=teacher_messages,
        expected_answer=None if expected is None else str(expected),
        extra_info=extra,
        epoch=epoch,
        line=text,
        end_offset=end_offset,
    )


@dataclass
class LineOutcome:
    """Result of :func:`handle_line` for one line."""

    row: Row | None = None
    """The valid row to send on, or None."""
    resumed: bool = False
    """True for a line that ended before a restart and is skipped."""


def handle_line(
    raw: bytes,
    *,
    too_long: bool,
    source: str,
    line_number: int,
    end_offset: int,
    epoch: int,
    routes: RouteTable,
    rejects: RejectsFile,
    metrics: Metrics,
    max_line_bytes: int,
    progress: ProgressTracker | None,
) -> LineOutcome:
    """Validate one line: return its row, or reject it, or skip it when blank or already ended."""
    if progress is not None and progress.is_finished(epoch=epoch, source=source, line_number=line_number):
        return LineOutcome(resumed=True)
    if not too_long and not raw.strip():
        if progress is not None:
            progress.finish(epoch=epoch, source=source, line_number=line_number, end_offset=end_offset)
        return LineOutcome()
    metrics.rows_read.inc()

    try:
        if too_long:
            raise InvalidRow("line_too_long", f"the line is longer than {max_line_bytes} bytes")
        row = parse_row(raw, source=source, line_number=line_number, routes=routes, epoch=epoch,
                        end_offset=end_offset)
    except InvalidRow as exc:
        # Later epochs see the same bad lines; reject each line once.
        if epoch == 0:
            rejects.write(
                reason=exc.reason, message=str(exc), source=source, line_number=line_number,
                raw=raw[:max_line_bytes], epoch=epoch, end_offset=end_offset,
            )
        elif progress is not None:
            progress.finish(epoch=epoch, source=source, line_number=line_number, end_offset=end_offset)
        return LineOutcome()
    return LineOutcome(row=row)


async def read_rows(
    send_rows: ObjectSendStream[Row],
    *,
    sources: list[Path],
    routes: RouteTable,
    rejects: RejectsFile,
    metrics: Metrics,
    stop: anyio.Event,
    epochs: int = 1,
    max_line_bytes: int = 1 << 20,
    progress: ProgressTracker | None = None,
) -> None:
    """Stage 1: send every valid row downstream, reject the rest, close the stream at the end.

    :param epochs: passes over ``sources``; 0 repeats until ``stop`` is set.
    :param progress: the resume cursor; lines it marks as ended are skipped,
        and each source is read from its low-watermark offset. Reading starts
        at its first incomplete epoch.
    """
    async with send_rows:
        epoch = progress.completed_epochs if progress is not None else 0
        while (epochs == 0 or epoch < epochs) and not stop.is_set():
            sent = 0
            resumed = 0
            for path in sources:
                source = str(path)
                first_line, offset = (0, 0) if progress is None else progress.resume_point(epoch=epoch, source=source)
                resumed += first_line
                last_line = first_line
                with path.open("rb") as handle:
                    if offset:
                        handle.seek(offset)
                    for line_number, raw, too_long, end_offset in _read_lines(
                        handle, max_line_bytes, first_line=first_line, offset=offset
                    ):
                        last_line = line_number
                        if stop.is_set():
                            log.info("reader_stopped", source=source, line_number=line_number, epoch=epoch)
                            return
                        outcome = handle_line(
                            raw, too_long=too_long, source=source, line_number=line_number, end_offset=end_offset,
                            epoch=epoch, routes=routes, rejects=rejects, metrics=metrics,
                            max_line_bytes=max_line_bytes, progress=progress,
                        )
                        if outcome.row is None:
                            resumed += outcome.resumed
                            continue

                        try:
                            await send_rows.send(outcome.row)
                        except anyio.BrokenResourceError:
                            # The sampler stopped admitting rows (stop request); nothing more to read.
                            log.info("reader_stopped", source=source, line_number=line_number, epoch=epoch)
                            return
                        sent += 1
                if progress is not None:
                    progress.source_read(epoch=epoch, source=source, last_line=last_line)
            if progress is not None:
                progress.epoch_read(epoch=epoch, sources=[str(path) for path in sources])
            log.info("reader_epoch_done", epoch=epoch, rows=sent)
            # An epoch with no valid row (and none that ended before a restart) would repeat forever.
            if sent == 0 and resumed == 0:
                break
            epoch += 1
