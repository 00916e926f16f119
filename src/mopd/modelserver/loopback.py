"""Run mopd-serve against model servers on loopback ports.

``start_model_server`` starts one ``mopd model-server`` child process and
waits until ``/health`` returns 200. Running this module (``make e2e``) starts
the trained demo student and teachers as three servers, distills the teachers
into the student with ``MOPD_BACKEND=openai`` over real HTTP, prints the
summary path, and exits 1 when the demo's improvement targets are missed:
an accuracy gain of at least 0.30 on every route, and a last reverse KL of at
most half the first.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import orjson

MIN_ACCURACY_GAIN = 0.30
MAX_KL_RATIO = 0.5


@dataclass
class ModelServerProcess:
    """A model server child process and its base URL."""

    process: subprocess.Popen[str]
    base_url: str
    name: str
    log_file: IO[str] | None = None

    def stop(self, timeout: float = 15.0) -> int:
        """Send SIGTERM, wait for the exit, kill after ``timeout`` seconds; return the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout)
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self.log_file is not None:
            self.log_file.close()
        return self.process.returncode

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Read the bound address from stdout and poll ``/health`` until it returns 200.

        Stops the process and raises RuntimeError when it exits or is not healthy within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        try:
            # 1. The first stdout line names the bound address (it comes after the model loaded).
            line = self.process.stdout.readline() if self.process.stdout is not None else ""
            if not line.startswith("listening on "):
                raise RuntimeError(f"model server {self.name!r} exited before listening (status {self.process.poll()})")
            self.base_url = line.split()[-1]

            # 2. Poll /health until the HTTP server accepts requests.
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"model server {self.name!r} exited with status {self.process.returncode}")
                try:
                    if httpx.get(self.base_url + "/health", timeout=2.0).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            raise RuntimeError(f"model server {self.name!r} was not healthy within {timeout} s")
        except BaseException:
            self.stop()
            raise


def launch_model_server(
    model_dir: Path, *, name: str, torch_threads: int = 1, log_path: Path | None = None
) -> ModelServerProcess:
    """Start ``mopd model-server`` on a free 127.0.0.1 port; call :meth:`ModelServerProcess.wait_ready` next."""
    log_file = log_path.open("w") if log_path is not None else None
    command = [sys.executable, "-m", "mopd.cli", "model-server", "--model", str(model_dir), "--port", "0",
               "--served-model-name", name, "--device", "cpu", "--torch-threads", str(torch_threads)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log_file or subprocess.DEVNULL, text=True)
    return ModelServerProcess(process=process, base_url="", name=name, log_file=log_file)


def start_model_server(
    model_dir: Path, *, name: str, torch_threads: int = 1, log_path: Path | None = None
) -> ModelServerProcess:
    """Start ``mopd model-server`` on a free 127.0.0.1 port and wait until it is healthy."""
    server = launch_model_server(model_dir, name=name, torch_threads=torch_threads, log_path=log_path)
    server.wait_ready()
    return server


def serve_environment(
    *,
    student: ModelServerProcess,
    student_dir: Path,
    teachers: dict[str, ModelServerProcess],
    data_path: Path,
    state_dir: Path,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Environment for a ``mopd-serve`` child that uses the given servers."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOPD_", "DISTILLATION_", "OPD_"))}
    teacher_list = [
        {"model": server.name, "route": route, "base_urls": [server.base_url]} for route, server in teachers.items()
    ]
    env.update({
        "MOPD_BACKEND": "openai",
        "MOPD_STUDENT_BASE_URLS": student.base_url,
        "MOPD_STUDENT_MODEL": student.name,
        "MOPD_STUDENT_MODEL_DIR": str(student_dir),
        "MOPD_TEACHERS": orjson.dumps(teacher_list).decode(),
        "MOPD_DATA_PATH": str(data_path),
        "MOPD_STATE_DIR": str(state_dir),
        "MOPD_DEVICE": "cpu",
        "MOPD_METRICS_PORT": "0",
        "MOPD_LOG_FORMAT": "json",
    })
    env.update(extra or {})
    return env


def check_summary(summary: dict[str, Any]) -> list[str]:
    """Return the demo targets the summary misses (empty when all are met)."""
    problems = []
    for route, figures in sorted(summary["routes"].items()):
        before, after = figures.get("accuracy_before"), figures.get("accuracy_after")
        if before is None or after is None or after - before < MIN_ACCURACY_GAIN:
            problems.append(f"{route}: accuracy {before} -> {after}, gain below {MIN_ACCURACY_GAIN}")
        first, last = figures.get("reverse_kl_first"), figures.get("reverse_kl_last")
        if first is None or last is None or last > MAX_KL_RATIO * first:
            problems.append(f"{route}: reverse KL {first} -> {last}, above {MAX_KL_RATIO} x first")
    return problems


def main(argv: list[str] | None = None) -> int:
    """Distill the trained demo teachers into the student through three loopback model servers."""
    from mopd.app import DEMO_GROUPS_PER_STEP, DEMO_MAX_STEPS
    from mopd.demo import ensure_demo

    parser = argparse.ArgumentParser(prog="python -m mopd.modelserver.loopback", description=main.__doc__)
    parser.add_argument("--state-dir", default="runs/e2e", help="run directory (default: runs/e2e)")
    parser.add_argument("--max-steps", type=int, default=DEMO_MAX_STEPS, help="optimizer steps")
    parser.add_argument("--demo-dir", default=None, help="demo cache directory (default: the user cache)")
    args = parser.parse_args(argv)

    assets = ensure_demo(Path(args.demo_dir) if args.demo_dir else None)
    state_dir = Path(args.state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 2) // 4)

    servers: list[ModelServerProcess] = []
    try:
        # 1. Start the three servers side by side, then wait for each.
        student = launch_model_server(assets.student_dir, name="student", torch_threads=threads,
                                      log_path=state_dir / "student-server.log")
        servers.append(student)
        teachers = {}
        for route, directory in sorted(assets.teacher_dirs.items()):
            teachers[route] = launch_model_server(directory, name=route, torch_threads=threads,
                                                  log_path=state_dir / f"{route}-server.log")
            servers.append(teachers[route])
        for server in servers:
            server.wait_ready()
        print(f"servers: student {student.base_url}, "
              + ", ".join(f"{r} {s.base_url}" for r, s in teachers.items()), flush=True)

        # 2. Distill through them, as the embedded demo does in-process.
        env = serve_environment(
            student=student, student_dir=assets.student_dir, teachers=teachers, data_path=assets.train_path,
            state_dir=state_dir, extra={
                "MOPD_EVAL_PATH": str(assets.heldout_path), "MOPD_EPOCHS": "0",
                "MOPD_MAX_STEPS": str(args.max_steps), "MOPD_PROMPT_GROUPS_PER_STEP": str(DEMO_GROUPS_PER_STEP),
                "MOPD_STUDENT_CONCURRENCY": str(DEMO_GROUPS_PER_STEP), "MOPD_TORCH_THREADS": str(threads),
            },
        )
        mopd_serve = Path(sys.executable).with_name("mopd-serve")
        with (state_dir / "mopd-serve.log").open("w") as log_file:
            result = subprocess.run([str(mopd_serve)], env=env, stdout=subprocess.PIPE, stderr=log_file, text=True)
        if result.returncode != 0:
            print(f"mopd-serve exited with status {result.returncode}; see {state_dir / 'mopd-serve.log'}",
                  file=sys.stderr)
            return 1
    finally:
        for server in servers:
            server.stop()

    summary_path = Path(result.stdout.strip().splitlines()[-1])
    print(summary_path)
    summary = orjson.loads(summary_path.read_bytes())
    for route, figures in sorted(summary["routes"].items()):
        print(f"{route}: accuracy {figures['accuracy_before']} -> {figures['accuracy_after']} "
              f"(teacher {figures['teacher_accuracy']}), reverse KL {figures['reverse_kl_first']:.4f} -> "
              f"{figures['reverse_kl_last']:.4f}")
    print(f"steps {summary['steps']}, policy version {summary['policy_version']}, "
          f"wall {summary['wall_seconds']} s")
    problems = check_summary(summary)
    for problem in problems:
        print(f"target missed: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
