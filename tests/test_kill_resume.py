"""mopd-serve killed with SIGKILL and restarted: every row ends exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

pytestmark = pytest.mark.slow

ROWS = 160


def serve(env: dict[str, str]) -> subprocess.Popen:
    full_env = {key: value for key, value in os.environ.items() if not key.startswith(("MOPD_", "DISTILLATION_"))}
    full_env.update(env, MOPD_LOG_FORMAT="json")
    return subprocess.Popen([sys.executable, "-m", "mopd.cli", "serve"], env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


def committed_step(state: Path) -> int:
    try:
        return orjson.loads((state / "checkpoint.json").read_bytes())["step"]
    except (FileNotFoundError, orjson.JSONDecodeError):
        return -1


def wait_for_commit(process: subprocess.Popen, state: Path, step: int) -> None:
    """Wait up to 120 s until a checkpoint of ``step`` or later is committed or the process ends."""
    deadline = time.monotonic() + 120
    while committed_step(state) < step and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)


def kill_after_step(env: dict[str, str], state: Path, step: int) -> None:
    """Start the service and SIGKILL it once a checkpoint of ``step`` or later is committed."""
    process = serve(env)
    try:
        wait_for_commit(process, state, step)
        assert process.poll() is None, "the service ended before it was killed"
        assert committed_step(state) >= step
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)


def stop_after_step(env: dict[str, str], state: Path, step: int, *, signals: int) -> int:
    """Start the service, send SIGTERM ``signals`` times once ``step`` is committed; return the exit status."""
    process = serve(env)
    try:
        wait_for_commit(process, state, step)
        assert process.poll() is None, "the service ended before it was stopped"
        for _ in range(signals):
            process.send_signal(signal.SIGTERM)
            # A drain of this small run takes about 20 ms, so the second signal must come sooner.
            time.sleep(0.005)
        process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode


def steps_logged(state: Path) -> int:
    return len((state / "steps.jsonl").read_bytes().splitlines())


def test_sigkill_and_restart_train_every_row_once(tiny_models: Path, tmp_path: Path) -> None:
    data = tmp_path / "rows.jsonl"
    lines = [orjson.dumps({"messages": [{"role": "user", "content": f"Solve {i} + 2."}],
                           "teacher": ("arithmetic-teacher", "math-teacher")[i % 2]}) for i in range(ROWS)]
    for position, bad in ((5, b"{broken"), (23, b'{"messages": [], "teacher": "math-teacher"}'), (41, b"[1]")):
        lines.insert(position, bad)
    data.write_bytes(b"\n".join(lines) + b"\n")
    state = tmp_path / "state"
    env = {
        "MOPD_DATA_PATH": str(data), "DISTILLATION_TEACHERS": "arithmetic-teacher,math-teacher",
        "MOPD_MODEL_ROOT": str(tiny_models), "MOPD_STUDENT_MODEL": "student", "MOPD_STATE_DIR": str(state),
        "MOPD_MAX_TOKENS": "4", "MOPD_COMPLETIONS_PER_PROMPT": "2", "MOPD_PROMPT_GROUPS_PER_STEP": "4",
        "MOPD_STUDENT_CONCURRENCY": "4", "MOPD_TORCH_THREADS": "1", "MOPD_METRICS_ENABLED": "false",
    }

    # 1. Two kills at commits, each followed by a restart of the same state directory.
    kill_after_step(env, state, 2)
    kill_after_step(env, state, committed_step(state) + 2)

    # 2. A graceful stop commits every step it logged; a second signal exits at once.
    assert stop_after_step(env, state, committed_step(state) + 1, signals=1) == 0
    assert committed_step(state) == steps_logged(state)
    assert stop_after_step(env, state, committed_step(state) + 1, signals=2) == 128 + signal.SIGTERM

    # 3. The last start runs to the end of the input.
    process = serve(env)
    stdout, _ = process.communicate(timeout=180)
    assert process.returncode == 0

    steps = [orjson.loads(x) for x in (state / "steps.jsonl").read_bytes().splitlines()]
    trained = Counter(row_id for step in steps for row_id in step["row_ids"])
    rejected = Counter(orjson.loads(x)["row_id"] for x in (state / "rejects.jsonl").read_bytes().splitlines())
    expected = {f"{data}:{n}" for n in range(1, len(lines) + 1)}
    bad = {f"{data}:{n}" for n in (6, 24, 42)}
    assert set(trained) == expected - bad
    assert max(trained.values()) == 1
    assert set(rejected) == bad
    assert max(rejected.values()) == 1
    summary = orjson.loads(Path(stdout.decode().strip().splitlines()[-1]).read_bytes())
    assert summary["rows_trained"] == ROWS
    assert summary["rows_rejected"] == 3
    assert summary["steps"] == len(steps)
    assert [step["policy_version"] for step in steps] == list(range(1, len(steps) + 1))
