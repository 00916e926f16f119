"""``mopd report``: curves read from a state directory and drawn into a PNG."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from mopd.cli import main
from mopd.report import ReportError, moving_average, read_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(state_dir: Path, *, steps: int = 30) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        record: dict[str, object] = {"step": step, "step_seconds": 0.5, "finished_at": 1000.0 + 2.0 * step}
        for route, start in (("arithmetic-teacher", 1.6), ("math-teacher", 0.8)):
            record[f"route/{route}/reverse_kl"] = start / step
            record[f"route/{route}/tokens"] = 100
        if step % 10 == 0:
            record["eval/arithmetic-teacher/accuracy"] = 0.3 + step / 100
            record["eval/math-teacher/accuracy"] = 0.2 + step / 100
            record["eval/math-teacher/trace_logprob_gap"] = 2.0 / step
        lines.append(orjson.dumps(record))
    (state_dir / "steps.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    summary = {"steps": steps, "routes": {
        "arithmetic-teacher": {"accuracy_before": 0.25, "accuracy_after": 0.6},
        "math-teacher": {"accuracy_before": 0.1, "accuracy_after": 0.5},
    }}
    (state_dir / "summary.json").write_bytes(orjson.dumps(summary))


def test_curves_cover_both_routes(tmp_path: Path) -> None:
    _write_run(tmp_path)
    curves = read_curves(tmp_path)
    assert sorted(curves) == ["arithmetic-teacher", "math-teacher"]
    arithmetic = curves["arithmetic-teacher"]
    assert arithmetic.reverse_kl[0] == (1, pytest.approx(1.6))
    assert len(arithmetic.reverse_kl) == 30
    # Steps finish 2 s apart, so 100 tokens a step are 50 tokens per second after the first step.
    assert arithmetic.tokens_per_second[1] == (2, pytest.approx(50.0))
    # Accuracy is drawn before training (step 0) and at each evaluation every 10 steps.
    # The last evaluation is at the final step, so the summary's after value is not drawn twice.
    assert [step for step, _ in arithmetic.accuracy] == [0, 10, 20, 30]
    assert arithmetic.accuracy[0] == (0, 0.25)
    assert curves["math-teacher"].trace_logprob_gap[-1] == (30, pytest.approx(2.0 / 30))


def test_report_command_writes_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_run(tmp_path / "run")
    assert main(["report", str(tmp_path / "run")]) == 0
    png = tmp_path / "run" / "report.png"
    assert capsys.readouterr().out.strip() == str(png)
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert png.stat().st_size > 10_000


def test_report_without_steps_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "steps.jsonl" in capsys.readouterr().err
    with pytest.raises(ReportError, match="MOPD_STATE_DIR"):
        read_curves(tmp_path / "missing")


def test_moving_average_skips_nonfinite() -> None:
    assert moving_average([(1, 1.0), (2, float("nan")), (3, 3.0)], width=2) == [(1, 1.0), (2, 1.0), (3, 2.0)]
