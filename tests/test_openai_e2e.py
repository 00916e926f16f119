"""mopd-serve with MOPD_BACKEND=openai against three model-server processes on loopback ports."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from mopd.modelserver.loopback import ModelServerProcess, launch_model_server, serve_environment

pytestmark = pytest.mark.slow

ROUTES = ("arithmetic-teacher", "math-teacher")
MOPD_SERVE = str(Path(sys.executable).with_name("mopd-serve"))


@pytest.fixture(scope="module")
def teacher_servers(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ModelServerProcess]]:
    logs = tmp_path_factory.mktemp("teacher-logs")
    servers = {route: launch_model_server(tiny_models / route, name=route, log_path=logs / f"{route}.log")
               for route in ROUTES}
    try:
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="module")
def student_server(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServerProcess]:
    logs = tmp_path_factory.mktemp("student-logs")
    server = launch_model_server(tiny_models / "student", name="student", log_path=logs / "student.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def served_name(server: ModelServerProcess) -> str:
    """Return the model name the server accepts now, because a run with lora weight sync renames the student."""
    return httpx.get(server.base_url + "/v1/models", timeout=5).json()["data"][0]["id"]


def test_serve_runs_to_completion(
    student_server: ModelServerProcess, teacher_servers: dict[str, ModelServerProcess], tiny_models: Path,
    gsm8k_routed: Path, tmp_path: Path,
) -> None:
    env = serve_environment(
        student=student_server, student_dir=tiny_models / "student", teachers=teacher_servers,
        data_path=gsm8k_routed, state_dir=tmp_path / "run", extra={
            "MOPD_MAX_STEPS": "3", "MOPD_PROMPT_GROUPS_PER_STEP": "4", "MOPD_COMPLETIONS_PER_PROMPT": "2",
            "MOPD_MAX_TOKENS": "8", "MOPD_TORCH_THREADS": "1", "MOPD_STUDENT_MODEL": served_name(student_server),
            # A LoRA trainer that publishes peft adapters, as a vLLM student needs.
            "MOPD_LORA_RANK": "4", "MOPD_LORA_PUBLISH": "adapter",
        },
    )

    result = subprocess.run([MOPD_SERVE], env=env, capture_output=True, text=True, timeout=150)

    assert result.returncode == 0, result.stderr[-3000:]
    summary_path = Path(result.stdout.strip().splitlines()[-1])
    assert summary_path == tmp_path / "run" / "summary.json"
    summary = orjson.loads(summary_path.read_bytes())
    assert summary["steps"] == 3
    assert summary["policy_version"] == 3
    assert summary["stopped_by"] == "max_steps"
    # The student server now serves the version-3 adapter under its own name.
    assert served_name(student_server).endswith("-v3")
    assert (tmp_path / "run" / "weights" / "v000003" / "adapter_config.json").is_file()
    steps = [orjson.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_bytes().splitlines()]
    assert [s["policy_version"] for s in steps] == [1, 2, 3]


def test_sigterm_mid_run_exits_zero(
    student_server: ModelServerProcess, teacher_servers: dict[str, ModelServerProcess], tiny_models: Path,
    gsm8k_routed: Path, tmp_path: Path,
) -> None:
    env = serve_environment(
        student=student_server, student_dir=tiny_models / "student", teachers=teacher_servers,
        data_path=gsm8k_routed, state_dir=tmp_path / "run", extra={
            "MOPD_EPOCHS": "0", "MOPD_PROMPT_GROUPS_PER_STEP": "2", "MOPD_COMPLETIONS_PER_PROMPT": "2",
            "MOPD_MAX_TOKENS": "8", "MOPD_TORCH_THREADS": "1", "MOPD_SHUTDOWN_GRACE_SECONDS": "20",
            "MOPD_OPENAI_WEIGHT_SYNC": "disk", "MOPD_STUDENT_MODEL": served_name(student_server),
        },
    )
    steps_path = tmp_path / "run" / "steps.jsonl"
    process = subprocess.Popen([MOPD_SERVE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # Wait for the first trained step, then stop the run.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if steps_path.exists() and steps_path.read_bytes().count(b"\n") >= 1:
                break
            time.sleep(0.2)
        assert process.poll() is None, "mopd-serve ended before it was stopped"
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 0, stderr[-3000:]
    summary = orjson.loads(Path(stdout.strip().splitlines()[-1]).read_bytes())
    assert summary["stopped_by"] == "signal"
    assert summary["steps"] >= 1
