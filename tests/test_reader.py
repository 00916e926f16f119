"""Reader: row validation, reason codes, the rejects file, row ids."""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import anyio
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mopd.errors import InvalidRow
from mopd.metrics import Metrics
from mopd.pipeline.reader import RejectsFile, RouteTable, parse_row, read_rows
from mopd.types import Row

ROUTES = RouteTable(
    route_key="teacher",
    messages_key_by_route={"math-teacher": "teacher_messages", "arithmetic-teacher": "hint_messages"},
)
USER = [{"role": "user", "content": "Solve 2 + 3. End with Final: <answer>."}]


def line(obj: object) -> bytes:
    return orjson.dumps(obj)


def parse(raw: bytes, routes: RouteTable = ROUTES) -> Row:
    return parse_row(raw, source="rows.jsonl", line_number=7, routes=routes)


def test_valid_row_gets_stable_id() -> None:
    row = parse(line({"messages": USER, "teacher": "math-teacher", "expected_answer": 5, "extra_info": {"k": 1}}))
    assert row.row_id == "rows.jsonl:7"
    assert row.route == "math-teacher"
    assert row.messages == tuple(USER)
    assert row.expected_answer == "5"
    assert row.extra_info == {"k": 1}
    assert row.teacher_messages is None


def test_teacher_messages_use_the_route_key_of_its_teacher() -> None:
    privileged = [{"role": "user", "content": "The answer is 5."}]
    row = parse(line({"messages": USER, "teacher": "arithmetic-teacher", "hint_messages": privileged,
                      "teacher_messages": USER}))
    assert row.teacher_messages == tuple(privileged)


def test_single_teacher_mode_ignores_route_key() -> None:
    single = RouteTable(route_key="teacher", messages_key_by_route={"only": "teacher_messages"}, single_route="only")
    row = parse(line({"messages": USER, "teacher": "somebody-else"}), routes=single)
    assert row.route == "only"


def test_content_parts_are_joined() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Solve "}, {"type": "text", "text": "1 + 1."}]}]
    row = parse(line({"messages": parts, "teacher": "math-teacher"}))
    assert row.messages[0]["content"] == "Solve 1 + 1."


def test_bom_and_carriage_return_are_accepted(tmp_path: Path) -> None:
    raw = b"\xef\xbb\xbf" + line({"messages": USER, "teacher": "math-teacher"})
    assert parse(raw).route == "math-teacher"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(b'{"messages": [', "invalid_json", id="invalid-json"),
        pytest.param(b'{"messages": "\xff\xfe"}', "invalid_utf8", id="invalid-utf8"),
        pytest.param(b'{"messages": []}\x00', "nul_byte", id="nul-byte"),
        pytest.param(b"[1, 2]", "not_an_object", id="array"),
        pytest.param(b'"text"', "not_an_object", id="string"),
        pytest.param(line({"teacher": "math-teacher"}), "missing_messages", id="missing-messages"),
        pytest.param(line({"messages": [], "teacher": "math-teacher"}), "empty_messages", id="empty-messages"),
        pytest.param(line({"messages": "hi", "teacher": "math-teacher"}), "invalid_messages", id="messages-string"),
        pytest.param(line({"messages": ["hi"], "teacher": "math-teacher"}), "invalid_messages", id="message-string"),
        pytest.param(line({"messages": [{"role": "robot", "content": "x"}], "teacher": "math-teacher"}),
                     "invalid_messages", id="unknown-role"),
        pytest.param(line({"messages": [{"role": "user", "content": 3}], "teacher": "math-teacher"}),
                     "invalid_messages", id="content-number"),
        pytest.param(line({"messages": [{"role": "user"}], "teacher": "math-teacher"}),
                     "invalid_messages", id="content-missing"),
        pytest.param(line({"messages": USER}), "missing_route", id="missing-route"),
        pytest.param(line({"messages": USER, "teacher": 3}), "invalid_route", id="route-number"),
        pytest.param(line({"messages": USER, "teacher": ""}), "invalid_route", id="route-empty"),
        pytest.param(line({"messages": USER, "teacher": "chemistry-teacher"}), "unknown_route", id="unknown-route"),
        pytest.param(line({"messages": USER, "teacher": "math-teacher", "teacher_messages": "x"}),
                     "invalid_teacher_messages", id="teacher-messages-string"),
        pytest.param(line({"messages": USER, "teacher": "math-teacher", "expected_answer": [1]}),
                     "invalid_expected_answer", id="answer-list"),
        pytest.param(line({"messages": USER, "teacher": "math-teacher", "expected_answer": True}),
                     "invalid_expected_answer", id="answer-bool"),
        pytest.param(line({"messages": USER, "teacher": "math-teacher", "extra_info": [1]}),
                     "invalid_extra_info", id="extra-info-list"),
    ],
)
def test_bad_row_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidRow) as caught:
        parse(raw)
    assert caught.value.reason == reason


def test_unknown_route_message_lists_configured_routes() -> None:
    with pytest.raises(InvalidRow, match="configured: arithmetic-teacher, math-teacher"):
        parse(line({"messages": USER, "teacher": "chemistry-teacher"}))


async def collect(path: Path, tmp_path: Path, **kwargs) -> tuple[list[Row], list[dict], Metrics]:
    metrics = Metrics()
    rejects = RejectsFile(tmp_path / "rejects.jsonl", metrics)
    send, receive = anyio.create_memory_object_stream[Row](1000)
    await read_rows(send, sources=[path], routes=ROUTES, rejects=rejects, metrics=metrics, stop=anyio.Event(),
                    **kwargs)
    rejects.close()
    async with receive:
        rows = [row async for row in receive]
    rejected = [orjson.loads(x) for x in (tmp_path / "rejects.jsonl").read_bytes().splitlines()]
    return rows, rejected, metrics


async def test_reader_goes_on_after_bad_rows(tmp_path: Path) -> None:
    good = line({"messages": USER, "teacher": "math-teacher"})
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join([good, b"{oops", b"", b"   ", good + b"\r", b'{"messages": "\xff"}', good]) + b"\n")

    rows, rejected, metrics = await collect(path, tmp_path)

    assert [row.line_number for row in rows] == [1, 5, 7]
    assert [r["reason"] for r in rejected] == ["invalid_json", "invalid_utf8"]
    assert metrics.value("mopd_rows_rejected_total", {"reason": "invalid_json"}) == 1
    assert metrics.value("mopd_rows_read_total") == 5


async def test_rejects_file_keeps_original_line(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"messages": [], "teacher": "math-teacher"}\n{"bad": "\xff"}\n')

    _, rejected, _ = await collect(path, tmp_path)

    first, second = rejected
    assert first["line"] == '{"messages": [], "teacher": "math-teacher"}'
    assert first["source"] == str(path)
    assert first["line_number"] == 1
    assert first["reason"] == "empty_messages"
    assert second["line_escaped"] == '{"bad": "\\xff"}'
    assert second["line_number"] == 2


async def test_oversized_line_is_rejected_and_reading_continues(tmp_path: Path) -> None:
    good = line({"messages": USER, "teacher": "math-teacher"})
    huge = line({"messages": [{"role": "user", "content": "x" * 5000}], "teacher": "math-teacher"})
    path = tmp_path / "rows.jsonl"
    path.write_bytes(huge + b"\n" + good + b"\n")

    rows, rejected, _ = await collect(path, tmp_path, max_line_bytes=1000)

    assert [r["reason"] for r in rejected] == ["line_too_long"]
    assert len(rejected[0]["line"]) <= 1000
    assert [row.line_number for row in rows] == [2]


async def test_epochs_repeat_rows_and_reject_once(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(line({"messages": USER, "teacher": "math-teacher"}) + b"\n{bad\n")

    rows, rejected, _ = await collect(path, tmp_path, epochs=3)

    assert [(row.row_id, row.epoch) for row in rows] == [(f"{path}:1", 0), (f"{path}:1", 1), (f"{path}:1", 2)]
    assert len(rejected) == 1


async def test_gsm8k_rows_parse(gsm8k_routed: Path, tmp_path: Path) -> None:
    rows, rejected, _ = await collect(gsm8k_routed, tmp_path)

    assert len(rows) == 200
    assert rejected == []
    assert {row.route for row in rows} == {"arithmetic-teacher", "math-teacher"}
    assert sum(row.teacher_messages is not None for row in rows if row.route == "math-teacher") > 0


# --- the catalogue of malformed lines --------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        pytest.param(b'{"messages": [], "teacher": "math-teacher"} trailing', "invalid_json", id="trailing-garbage"),
        pytest.param(b'{"messages": NaN}', "invalid_json", id="nan-literal"),
        pytest.param(b'{"messages": "\\ud800"}', "invalid_json", id="lone-surrogate-escape"),
        pytest.param(b'{"a": 1e999}', "invalid_json", id="number-out-of-range"),
        pytest.param(b"[" * 5000, "invalid_json", id="deeply-nested"),
        pytest.param(b"\xef\xbb\xbf", "invalid_json", id="only-bom"),
        pytest.param(b"\xef\xbb\xbf\xef\xbb\xbf{}", "invalid_json", id="double-bom"),
        pytest.param(b"\xc3\x28", "invalid_utf8", id="invalid-continuation-byte"),
        pytest.param(b"\xed\xa0\x80", "invalid_utf8", id="encoded-surrogate"),
        pytest.param(b"null", "not_an_object", id="null"),
        pytest.param(b"42", "not_an_object", id="number"),
        pytest.param(line({"messages": None, "teacher": "math-teacher"}), "invalid_messages", id="messages-null"),
        pytest.param(line({"messages": {"role": "user"}, "teacher": "math-teacher"}), "invalid_messages",
                     id="messages-object"),
        pytest.param(line({"messages": [{"role": None, "content": "x"}], "teacher": "math-teacher"}),
                     "invalid_messages", id="role-null"),
        pytest.param(line({"messages": [{"role": "user", "content": None}], "teacher": "math-teacher"}),
                     "invalid_messages", id="content-null"),
        pytest.param(line({"messages": [{"role": "user", "content": [{"type": "image_url"}]}],
                           "teacher": "math-teacher"}), "invalid_messages", id="content-image-part"),
        pytest.param(line({"messages": USER, "teacher": None}), "invalid_route", id="route-null"),
        pytest.param(line({"messages": USER, "teacher": ["math-teacher"]}), "invalid_route", id="route-list"),
        pytest.param(line({"messages": USER, "teacher": "Math-Teacher"}), "unknown_route", id="route-case"),
        pytest.param(line({"messages": USER, "teacher": "math-teacher", "teacher_messages": []}),
                     "invalid_teacher_messages", id="teacher-messages-empty"),
        pytest.param(line({"messages": USER, "teacher": "math-teacher", "extra_info": "x"}),
                     "invalid_extra_info", id="extra-info-string"),
    ],
)
def test_malformed_line_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidRow) as caught:
        parse(raw)
    assert caught.value.reason == reason


async def test_crlf_file_with_bom_reads_every_row(tmp_path: Path) -> None:
    good = line({"messages": USER, "teacher": "math-teacher"})
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\r\n" + good + b"\r\n\r\n" + good)

    rows, rejected, _ = await collect(path, tmp_path)

    assert [row.line_number for row in rows] == [1, 2, 4]
    assert rejected == []


async def test_every_reject_record_holds_line_source_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"messages": [], "teacher": "math-teacher"}\n\xff\xfe\x00\n{broken\n')

    _, rejected, _ = await collect(path, tmp_path)

    assert len(rejected) == 3
    for number, record in enumerate(rejected, start=1):
        assert record["source"] == str(path)
        assert record["line_number"] == number
        assert record["row_id"] == f"{path}:{number}"
        assert record["reason"]
        assert ("line" in record) != ("line_escaped" in record)
    assert rejected[1]["line_escaped"] == "\\xff\\xfe\x00"


# --- arbitrary input -------------------------------------------------------------------

LINE_PIECES = st.one_of(
    st.binary(max_size=80),
    st.sampled_from([
        line({"messages": USER, "teacher": "math-teacher"}),
        line({"messages": USER, "teacher": "arithmetic-teacher", "hint_messages": USER}),
        b"\xef\xbb\xbf" + line({"messages": USER, "teacher": "math-teacher"}),
        b"", b"   ", b"\r", b"{", b"\x00", b"\xff",
    ]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pieces=st.lists(LINE_PIECES, max_size=12), newline=st.sampled_from([b"\n", b"\r\n"]),
       final_newline=st.booleans())
def test_arbitrary_bytes_end_as_rows_or_rejects(pieces: list[bytes], newline: bytes, final_newline: bool) -> None:
    content = newline.join(pieces) + (newline if final_newline and pieces else b"")
    max_line_bytes = 64

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "rows.jsonl"
        path.write_bytes(content)
        rows, rejected, _ = anyio.run(partial(collect, path, Path(directory), max_line_bytes=max_line_bytes))

    # Lines as the reader numbers them: split at b"\n"; a last piece without newline is a line too.
    numbered = content.split(b"\n")
    if numbered and numbered[-1] == b"":
        numbered.pop()
    expected = {number for number, piece in enumerate(numbered, start=1)
                if len(piece) > max_line_bytes or piece.strip()}
    row_lines = [row.line_number for row in rows]
    reject_lines = [record["line_number"] for record in rejected]
    assert len(row_lines) == len(set(row_lines))
    assert len(reject_lines) == len(set(reject_lines))
    assert set(row_lines).isdisjoint(reject_lines)
    assert set(row_lines) | set(reject_lines) == expected
