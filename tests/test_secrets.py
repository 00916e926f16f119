"""API keys from the environment never reach logs, metrics, status or any file the service writes."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from mopd.modelserver.faults import FaultProxy
from mopd.modelserver.loopback import ModelServerProcess, launch_model_server, serve_environment

pytestmark = pytest.mark.slow

MOPD_SERVE = str(Path(sys.executable).with_name("mopd-serve"))
KEYS = {
    "MOPD_STUDENT_API_KEY": "sk-student-7f3a9c1e55d0",
    "MOPD_TEACHER_API_KEY": "sk-teacher-2b8e4d6f91aa",
    "TINKER_API_KEY": "tml-tinker-5c0e7a3b2d19",
}


@pytest.fixture
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def servers(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ModelServerProcess]]:
    logs = tmp_path_factory.mktemp("server-logs")
    started = {name: launch_model_server(tiny_models / name, name=name, log_path=logs / f"{name}.log")
               for name in ("student", "arithmetic-teacher", "math-teacher")}
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


def test_api_keys_appear_in_no_output(
    servers: dict[str, ModelServerProcess], tiny_models: Path, tmp_path: Path, free_port: int
) -> None:
    # A storm of 5xx responses in front of one teacher makes the client log errors and retries.
    proxy = FaultProxy(servers["math-teacher"].base_url, name="math-teacher").start()
    proxy.set_storm(0.5)
    data = tmp_path / "rows.jsonl"
    rows = [orjson.dumps({"messages": [{"role": "user", "content": f"Solve {i} + 2."}],
                          "teacher": ("arithmetic-teacher", "math-teacher")[i % 2]}) for i in range(24)]
    data.write_bytes(b"\n".join([*rows, b"{broken", b'{"messages": [], "teacher": "math-teacher"}']) + b"\n")
    teachers = {"arithmetic-teacher": servers["arithmetic-teacher"],
                "math-teacher": ModelServerProcess(process=servers["math-teacher"].process, base_url=proxy.base_url,
                                                   name="math-teacher")}
    state = tmp_path / "state"
    env = serve_environment(
        student=servers["student"], student_dir=tiny_models / "student", teachers=teachers, data_path=data,
        state_dir=state, extra={
            **KEYS, "MOPD_PROMPT_GROUPS_PER_STEP": "4", "MOPD_COMPLETIONS_PER_PROMPT": "2", "MOPD_MAX_TOKENS": "6",
            "MOPD_TORCH_THREADS": "1", "MOPD_METRICS_PORT": str(free_port), "MOPD_OPENAI_MAX_RETRIES": "1",
            "MOPD_OPENAI_RETRY_BASE_SECONDS": "0.05", "MOPD_TEACHER_BREAKER_COOLDOWN_SECONDS": "0.2",
            "MOPD_OPENAI_WEIGHT_SYNC": "disk", "MOPD_LOG_LEVEL": "debug",
            "MOPD_STUDENT_MODEL": httpx.get(servers["student"].base_url + "/v1/models").json()["data"][0]["id"],
        },
    )
    scraped: list[str] = []
    process = subprocess.Popen([MOPD_SERVE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # Scrape every endpoint while the run goes on.
        deadline = time.monotonic() + 150
        while process.poll() is None and time.monotonic() < deadline:
            for path in ("/metrics", "/status", "/readyz", "/healthz"):
                try:
                    scraped.append(httpx.get(f"http://127.0.0.1:{free_port}{path}", timeout=2).text)
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
        proxy.stop()

    assert process.returncode == 0, stderr.decode()[-3000:]
    assert proxy.counters.injected > 0
    assert any("mopd_rows_read_total" in text for text in scraped)
    outputs = {"stdout": stdout, "stderr": stderr, "endpoints": "\n".join(scraped).encode()}
    for path in state.rglob("*"):
        if path.is_file():
            outputs[str(path.relative_to(state))] = path.read_bytes()
    assert "rejects.jsonl" in outputs
    assert "checkpoint.json" in outputs
    assert b"http_call_retry" in stderr
    for name, key in KEYS.items():
        for where, content in outputs.items():
            assert key.encode() not in content, f"{name} found in {where}"
