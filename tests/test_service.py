"""The whole service on real tiny transformers models: in-process and as a process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import orjson
import pytest

from mopd.app import run
from mopd.metrics import Metrics
from mopd.settings import load_settings

pytestmark = pytest.mark.slow


def service_env(tiny_models: Path, data: Path, state: Path, **extra: str) -> dict[str, str]:
    return {
        "MOPD_DATA_PATH": str(data),
        "DISTILLATION_TEACHERS": "arithmetic-teacher,math-teacher",
        "MOPD_MODEL_ROOT": str(tiny_models),
        "MOPD_STUDENT_MODEL": "student",
        "MOPD_STATE_DIR": str(state),
        "MOPD_MAX_TOKENS": "4",
        "MOPD_COMPLETIONS_PER_PROMPT": "2",
        "MOPD_PROMPT_GROUPS_PER_STEP": "16",
        "MOPD_STUDENT_CONCURRENCY": "16",
        "MOPD_TORCH_THREADS": "2",
        "MOPD_METRICS_ENABLED": "false",
        **extra,
    }


async def test_gsm8k_rows_end_trained_or_rejected(tiny_models: Path, gsm8k_routed: Path, tmp_path: Path) -> None:
    settings = load_settings(service_env(tiny_models, gsm8k_routed, tmp_path / "state"))

    with anyio.fail_after(240):
        outcome = await run(settings, metrics=Metrics(), stop=anyio.Event())

    all_ids = {f"{gsm8k_routed}:{n}" for n in range(1, 201)}
    steps = [orjson.loads(x) for x in (tmp_path / "state" / "steps.jsonl").read_bytes().splitlines()]
    trained = [row_id for step in steps for row_id in step["row_ids"]]
    rejects = [orjson.loads(x) for x in (tmp_path / "state" / "rejects.jsonl").read_bytes().splitlines()]
    rejected = [r["row_id"] for r in rejects]

    assert len(trained) == len(set(trained)), "a row was trained twice"
    assert set(trained).isdisjoint(rejected)
    assert set(trained) | set(rejected) == all_ids
    assert all(r["reason"] for r in rejects)
    assert outcome.summary["rows_trained"] == len(trained)
    assert outcome.summary["rows_rejected"] == len(rejected)
    assert len(trained) > 100
    assert set(outcome.summary["routes"]) == {"arithmetic-teacher", "math-teacher"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(env: dict[str, str]) -> subprocess.Popen:
    full_env = {key: value for key, value in os.environ.items() if not key.startswith(("MOPD_", "DISTILLATION_"))}
    full_env.update(env, MOPD_LOG_FORMAT="json")
    return subprocess.Popen([sys.executable, "-m", "mopd.cli", "serve"], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def scored_by_route(port: int) -> dict[str, float]:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return {}
    values = {}
    for line in text.splitlines():
        if line.startswith("mopd_teacher_route_scored_total{"):
            route = line.split('route="', 1)[1].split('"', 1)[0]
            values[route] = float(line.rsplit(" ", 1)[1])
    return values


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_signal_stops_service_cleanly(tiny_models: Path, tmp_path: Path, signum: int) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b"".join(
        orjson.dumps({"messages": [{"role": "user", "content": f"Solve {i} + 2."}],
                      "teacher": ("arithmetic-teacher", "math-teacher")[i % 2]}) + b"\n"
        for i in range(64)
    ))
    port = free_port()
    env = service_env(tiny_models, data, tmp_path / "state", MOPD_EPOCHS="0", MOPD_METRICS_ENABLED="true",
                      MOPD_METRICS_PORT=str(port), MOPD_PROMPT_GROUPS_PER_STEP="4",
                      MOPD_SHUTDOWN_GRACE_SECONDS="20")
    process = start_service(env)
    try:
        # Wait until both routes have been scored, as a dashboard would see it.
        deadline = time.monotonic() + 120
        scored: dict[str, float] = {}
        while time.monotonic() < deadline and process.poll() is None:
            scored = scored_by_route(port)
            if len(scored) == 2 and min(scored.values()) > 0:
                break
            time.sleep(0.5)
        assert scored.get("arithmetic-teacher", 0) > 0
        assert scored.get("math-teacher", 0) > 0

        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 0, stderr.decode()[-2000:]
    summary_path = Path(stdout.decode().strip().splitlines()[-1])
    summary = orjson.loads(summary_path.read_bytes())
    assert summary["stopped_by"] == "signal"
    assert summary["steps"] >= 1
    events = [orjson.loads(line) for line in stderr.splitlines() if line.startswith(b"{")]
    names = [event["event"] for event in events]
    assert "stop_requested" in names
    assert "service_stopped" in names


def test_bad_configuration_exits_with_message(tmp_path: Path) -> None:
    process = start_service({"DISTILLATION_TEACHERS": "a,,b", "MOPD_DATA_PATH": str(tmp_path / "x.jsonl"),
                             "MOPD_STUDENT_MODEL": "s"})
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert b"DISTILLATION_TEACHERS='a,,b' has an empty entry at position 2" in stderr


def test_missing_model_directory_exits_with_message(tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text("")
    process = start_service({"DISTILLATION_TEACHERS": "a", "MOPD_DATA_PATH": str(data),
                             "MOPD_STUDENT_MODEL": str(tmp_path / "nowhere"), "MOPD_METRICS_ENABLED": "false",
                             "MOPD_STATE_DIR": str(tmp_path / "state")})
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert b"MOPD_STUDENT_MODEL" in stderr
    assert b"is not a local model directory" in stderr
