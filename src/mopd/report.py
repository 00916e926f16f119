"""``mopd report``: draw a run's per-route curves from its state directory.

The report reads ``steps.jsonl``, one record per optimizer step with the
evaluation figures of every ``MOPD_EVAL_EVERY_STEPS`` steps merged in. When
present, ``summary.json`` adds the accuracy before and after training. The
PNG has three panels over optimizer steps, one line per route: sampled
reverse KL, held-out accuracy, and trained tokens per second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from mopd.errors import MopdError

SMOOTHING_STEPS = 20
"""Width of the moving average drawn over the noisy per-step curves."""


class ReportError(MopdError):
    """The state directory has nothing to draw."""


@dataclass
class RouteCurves:
    """Per-step values of one route; every list is (step, value) pairs."""

    reverse_kl: list[tuple[int, float]] = field(default_factory=list)
    tokens_per_second: list[tuple[int, float]] = field(default_factory=list)
    accuracy: list[tuple[int, float]] = field(default_factory=list)
    trace_logprob_gap: list[tuple[int, float]] = field(default_factory=list)


def read_curves(state_dir: Path) -> dict[str, RouteCurves]:
    """Collect per-route curves from ``steps.jsonl`` and ``summary.json`` in ``state_dir``.

    :raises ReportError: when the directory contains no step records.
    """
    steps_path = state_dir / "steps.jsonl"
    if not steps_path.is_file():
        raise ReportError(f"{str(steps_path)!r} does not exist; point the report at the MOPD_STATE_DIR of a run")
    records = [orjson.loads(line) for line in steps_path.read_bytes().splitlines() if line.strip()]
    if not records:
        raise ReportError(f"no step records in {str(steps_path)!r}: the run has not finished a step yet; run mopd-serve until it logs a train_step")

    curves: dict[str, RouteCurves] = {}
    previous_finish: float | None = None
    for record in records:
        step = int(record["step"])
        # Wall time between step ends includes sampling and scoring, not only the optimizer step.
        finished = record.get("finished_at")
        elapsed = record.get("step_seconds") or 0.0
        if previous_finish is not None and finished is not None:
            elapsed = max(finished - previous_finish, 1e-9)
        previous_finish = finished if finished is not None else previous_finish
        for key, value in record.items():
            parts = key.split("/")
            if len(parts) != 3 or parts[0] not in ("route", "eval") or value is None:
                continue
            _, route, name = parts
            route_curves = curves.setdefault(route, RouteCurves())
            if parts[0] == "route" and name == "reverse_kl" and record.get(f"route/{route}/tokens"):
                route_curves.reverse_kl.append((step, float(value)))
            elif parts[0] == "route" and name == "tokens" and elapsed:
                route_curves.tokens_per_second.append((step, float(value) / elapsed))
            elif parts[0] == "eval" and name == "accuracy":
                route_curves.accuracy.append((step, float(value)))
            elif parts[0] == "eval" and name == "trace_logprob_gap":
                route_curves.trace_logprob_gap.append((step, float(value)))

    # The summary's before and after accuracy frame the evaluations made during training.
    summary_path = state_dir / "summary.json"
    if summary_path.is_file():
        summary = orjson.loads(summary_path.read_bytes())
        last_step = int(summary.get("steps") or records[-1]["step"])
        for route, figures in (summary.get("routes") or {}).items():
            route_curves = curves.setdefault(route, RouteCurves())
            if figures.get("accuracy_before") is not None:
                route_curves.accuracy.insert(0, (0, float(figures["accuracy_before"])))
            if figures.get("accuracy_after") is not None and not any(s == last_step for s, _ in route_curves.accuracy):
                route_curves.accuracy.append((last_step, float(figures["accuracy_after"])))
    return curves


def moving_average(points: list[tuple[int, float]], width: int = SMOOTHING_STEPS) -> list[tuple[int, float]]:
    """Trailing mean over ``width`` points; non-finite values are left out."""
    smoothed = []
    window: list[float] = []
    for step, value in points:
        if math.isfinite(value):
            window.append(value)
        window = window[-width:]
        if window:
            smoothed.append((step, sum(window) / len(window)))
    return smoothed


def write_report(state_dir: Path, output: Path | None = None) -> Path:
    """Draw the curves of the run in ``state_dir`` into a PNG and return its path.

    :param output: PNG path; None means ``<state_dir>/report.png``.
    :raises ReportError: when there is nothing to draw.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = read_curves(state_dir)
    output = output or state_dir / "report.png"
    figure, (kl_axes, accuracy_axes, speed_axes) = plt.subplots(3, 1, figsize=(9, 11), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    for index, (route, route_curves) in enumerate(sorted(curves.items())):
        color = colors[index % len(colors)]
        _draw(kl_axes, route_curves.reverse_kl, color=color, label=route, smooth=True)
        _draw(speed_axes, route_curves.tokens_per_second, color=color, label=route, smooth=True)
        if route_curves.accuracy:
            steps, values = zip(*route_curves.accuracy, strict=True)
            accuracy_axes.plot(steps, values, marker="o", color=color, label=route)

    kl_axes.set_title("Sampled reverse KL per token (thin: per step, thick: moving average)")
    kl_axes.set_ylabel("reverse KL (nats)")
    accuracy_axes.set_title("Held-out greedy exact-match accuracy")
    accuracy_axes.set_ylabel("accuracy")
    accuracy_axes.set_ylim(-0.02, 1.02)
    speed_axes.set_title("Trained completion tokens per second of wall time")
    speed_axes.set_ylabel("tokens / s")
    speed_axes.set_xlabel("optimizer step")
    for axes in (kl_axes, accuracy_axes, speed_axes):
        axes.grid(alpha=0.3)
        if axes.has_data():
            axes.legend(loc="best")
    figure.suptitle(f"mopd run: {state_dir}")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=100)
    plt.close(figure)
    return output


def _draw(axes: Any, points: list[tuple[int, float]], *, color: str, label: str, smooth: bool) -> None:
    if not points:
        return
    steps, values = zip(*points, strict=True)
    axes.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
    if smooth:
        averaged = moving_average(points)
        axes.plot([s for s, _ in averaged], [v for _, v in averaged], color=color, linewidth=2.0, label=label)
