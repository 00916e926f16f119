"""Fault-injection run: kill and restart mopd-serve while its teachers fail, then count every row.

``make chaos`` runs this script. It

1. builds random-init demo models (a few seconds) and an input of routed rows
   with some malformed lines mixed in,
2. starts the student and both teachers as loopback ``mopd model-server``
   processes, with a fault proxy (``mopd.modelserver.faults``) in front of
   each teacher,
3. runs mopd-serve (``MOPD_BACKEND=openai``) as a child process and kills it
   with SIGKILL at random points, most while it trains and some during its
   start-up. Each restart uses the same state directory. Meanwhile a
   schedule takes each teacher down for a while and throws storms of 500/503
   responses,
4. lets the last start run to the end of the input, and
5. compares the trainer's record of trained rows (``steps.jsonl``) and the
   rejects and dead-letter files with the input.

The last line printed is one JSON object: rows_in, rows_trained,
rows_rejected, rows_dead_lettered, rows_lost, rows_trained_twice,
rows_ended_twice, restarts, outages and storms per teacher, secret_leaks and
seconds. The exit status is 1 when a row was lost or trained twice, fewer
restarts or outages than asked for happened, or a secret leaked.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import orjson

from mopd.demo.build import build_untrained
from mopd.modelserver.faults import FaultProxy
from mopd.modelserver.loopback import ModelServerProcess, launch_model_server, serve_environment

SECRET = "sk-chaos-teacher-4c1d9e"
"""API key given to mopd-serve; it must appear in no log, metric or output file."""

MALFORMED_LINES = [
    b"{this is not json",
    b'{"messages": "\xff\xfe not utf-8"}',
    b'{"messages": [], "teacher": "math-teacher"}',
    b'{"teacher": "math-teacher"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "teacher": "chemistry-teacher"}',
    b'{"messages": [{"role": "user", "content": "hi"}], "teacher": 7}',
    b'[1, 2, 3]',
    b'{"messages": [{"role": "user", "content": "nul \x00 byte"}], "teacher": "math-teacher"}',
    b'{"messages": [{"role": "robot", "content": "hi"}], "teacher": "math-teacher"}',
    b'{"messages": [{"role": "user", "content": "' + b"x" * 3000 + b'"}], "teacher": "math-teacher"}',
]


def write_input(train_path: Path, target: Path, *, rows: int, rng: random.Random) -> int:
    """Write ``rows`` demo rows with the malformed lines spread among them; return the non-blank line count."""
    good = [line for line in train_path.read_bytes().splitlines() if line.strip()][:rows]
    lines = list(good)
    for bad in MALFORMED_LINES:
        lines.insert(rng.randrange(len(lines) + 1), bad)
    target.write_bytes(b"\n".join(lines) + b"\n")
    return len(lines)


class FaultSchedule:
    """Outages and storms per teacher at planned times, run on a thread."""

    def __init__(self, proxies: dict[str, FaultProxy], *, seconds: float, rng: random.Random) -> None:
        self.proxies = proxies
        self.events: list[tuple[float, str, str, float]] = []
        # One outage and one storm per teacher in the first 80% of the loop, not overlapping per teacher.
        for route in sorted(proxies):
            outage_at = rng.uniform(0.05, 0.35) * seconds
            storm_at = rng.uniform(0.45, 0.75) * seconds
            self.events.append((outage_at, route, "down", rng.uniform(6.0, 12.0)))
            self.events.append((storm_at, route, "storm", rng.uniform(6.0, 10.0)))
        self.events.sort()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-schedule", daemon=True)
        self.done = threading.Event()

    def start(self) -> None:
        self._started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        for proxy in self.proxies.values():
            proxy.set_up()

    def _run(self) -> None:
        ends: list[tuple[float, str]] = []
        pending = list(self.events)
        while not self._stop.is_set() and (pending or ends):
            now = time.monotonic() - self._started
            while pending and pending[0][0] <= now:
                _, route, kind, duration = pending.pop(0)
                if kind == "down":
                    self.proxies[route].set_down()
                else:
                    self.proxies[route].set_storm(0.5)
                print(f"  t={now:6.1f}s {route}: {kind} for {duration:.1f} s", flush=True)
                ends.append((now + duration, route))
            for end in [e for e in ends if e[0] <= now]:
                ends.remove(end)
                self.proxies[end[1]].set_up()
                print(f"  t={now:6.1f}s {end[1]}: up", flush=True)
            self._stop.wait(0.1)
        self.done.set()


def count_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def account(data_path: Path, state_dir: Path) -> dict[str, int]:
    """Compare every input line with the trained, rejected and dead-lettered rows."""
    source = str(data_path)
    input_ids = {f"{source}:{number}" for number, line in enumerate(data_path.read_bytes().split(b"\n"), start=1)
                 if line.strip()}
    trained = Counter(row_id for step in count_records(state_dir / "steps.jsonl") for row_id in step["row_ids"])
    rejected = Counter(r["row_id"] for r in count_records(state_dir / "rejects.jsonl"))
    dead = Counter(r["row_id"] for r in count_records(state_dir / "dead_letters.jsonl"))
    ended = Counter()
    for ids in (trained, rejected, dead):
        ended.update(set(ids))
    return {
        "rows_in": len(input_ids),
        "rows_trained": len(trained),
        "rows_rejected": len(rejected),
        "rows_dead_lettered": len(dead),
        "rows_lost": len(input_ids - set(ended)),
        "rows_trained_twice": sum(1 for count in trained.values() if count > 1),
        "rows_ended_twice": sum(1 for count in ended.values() if count > 1)
        + sum(1 for count in rejected.values() if count > 1) + sum(1 for count in dead.values() if count > 1),
        "rows_unknown": len(set(ended) - input_ids),
    }


def secret_leaks(paths: list[Path]) -> int:
    """Count files under ``paths`` whose bytes contain the secret."""
    leaks = 0
    needle = SECRET.encode()
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            if needle in path.read_bytes():
                print(f"secret found in {path}", file=sys.stderr)
                leaks += 1
    return leaks


READY_EVENT = b'"pipeline_starting"'
"""Log event after which mopd-serve has restored its state and is training."""


def wait_ready(process: subprocess.Popen, log_path: Path, timeout: float) -> bool:
    """Wait until the service logs that its pipeline started; False when it exited or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if READY_EVENT in log_path.read_bytes():
            return True
        time.sleep(0.1)
    return False


def run_life(command: list[str], env: dict[str, str], log_path: Path, *, kill: tuple[str, float] | None,
             timeout: float) -> tuple[int | None, float]:
    """Run mopd-serve once and SIGKILL it at the point ``kill`` names; None waits for its exit.

    ``kill`` is ("start", s) to kill s seconds after the process started, or
    ("ready", s) to kill s seconds after its pipeline started. Returns the
    exit status (None when killed here) and the seconds it ran.
    """
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            if kill is None:
                process.wait(timeout=timeout)
                return process.returncode, time.monotonic() - started
            point, delay = kill
            if point == "ready" and not wait_ready(process, log_path, timeout):
                if process.poll() is not None:
                    return process.returncode, time.monotonic() - started
            try:
                process.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=30)
                return None, time.monotonic() - started
            return process.returncode, time.monotonic() - started
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/chaos.py", description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=20, help="SIGKILLs and restarts of mopd-serve (default 20)")
    parser.add_argument("--rows", type=int, default=2000, help="valid input rows (default 2000)")
    parser.add_argument("--seed", type=int, default=7, help="seed of kill times and faults (default 7)")
    parser.add_argument("--kill-window", type=float, default=8.0,
                        help="a kill lands up to this many seconds after the pipeline started (default 8)")
    parser.add_argument("--startup-kills", type=float, default=0.2,
                        help="share of kills that land during start-up instead (default 0.2)")
    parser.add_argument("--dir", default=None, help="work directory (default: a new temporary directory)")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    started = time.monotonic()
    work = Path(args.dir or tempfile.mkdtemp(prefix="mopd-chaos-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    state_dir, logs_dir = work / "state", work / "logs"
    logs_dir.mkdir(exist_ok=True)
    print(f"chaos: work directory {work}", flush=True)

    # 1. Models and input.
    assets = build_untrained(work / "models")
    data_path = work / "rows.jsonl"
    write_input(assets.train_path, data_path, rows=args.rows, rng=rng)

    servers: list[ModelServerProcess] = []
    proxies: dict[str, FaultProxy] = {}
    schedule: FaultSchedule | None = None
    lives: list[dict] = []
    try:
        # 2. Servers and fault proxies.
        student = launch_model_server(assets.student_dir, name="student", log_path=logs_dir / "student-server.log")
        servers.append(student)
        teachers = {}
        for route, directory in sorted(assets.teacher_dirs.items()):
            teachers[route] = launch_model_server(directory, name=route, log_path=logs_dir / f"{route}-server.log")
            servers.append(teachers[route])
        for server in servers:
            server.wait_ready()
        for index, (route, server) in enumerate(sorted(teachers.items())):
            proxies[route] = FaultProxy(server.base_url, seed=args.seed + index, name=route).start()
        fronted = {route: ModelServerProcess(process=server.process, base_url=proxies[route].base_url,
                                             name=server.name) for route, server in teachers.items()}
        env = serve_environment(
            student=student, student_dir=assets.student_dir, teachers=fronted, data_path=data_path,
            state_dir=state_dir, extra={
                "MOPD_EPOCHS": "1", "MOPD_PROMPT_GROUPS_PER_STEP": "8", "MOPD_COMPLETIONS_PER_PROMPT": "2",
                "MOPD_MAX_TOKENS": "8", "MOPD_STUDENT_CONCURRENCY": "8", "MOPD_TORCH_THREADS": "1",
                "MOPD_METRICS_ENABLED": "false", "MOPD_TEACHER_API_KEY": SECRET,
                "MOPD_DEAD_LETTER_SECONDS": "20", "MOPD_TEACHER_BREAKER_FAILURES": "2",
                "MOPD_TEACHER_BREAKER_COOLDOWN_SECONDS": "1", "MOPD_OPENAI_MAX_RETRIES": "2",
                "MOPD_OPENAI_RETRY_BASE_SECONDS": "0.1", "MOPD_OPENAI_RETRY_MAX_SECONDS": "1",
                "MOPD_OPENAI_CONNECT_TIMEOUT_SECONDS": "2", "MOPD_OPENAI_READ_TIMEOUT_SECONDS": "20",
                "MOPD_ROUTE_STALL_SECONDS": "30", "MOPD_SHUTDOWN_GRACE_SECONDS": "10",
            },
        )
        command = [str(Path(sys.executable).with_name("mopd-serve"))]

        # 3. Kill and restart while the faults run.
        # About 8 s of start-up on 2 loaded cores, then half the kill window.
        expected_loop = args.restarts * (8.0 + args.kill_window / 2)
        schedule = FaultSchedule(proxies, seconds=expected_loop, rng=rng)
        schedule.start()
        kills = 0
        while kills < args.restarts or not schedule.done.is_set():
            if rng.random() < args.startup_kills:
                kill = ("start", rng.uniform(0.5, 6.0))
            else:
                kill = ("ready", rng.uniform(0.0, args.kill_window))
            code, seconds = run_life(command, env, logs_dir / f"serve-{len(lives):03d}.log", kill=kill, timeout=120)
            lives.append({"killed": code is None, "exit": code, "seconds": round(seconds, 1), "point": kill[0]})
            if code is None:
                kills += 1
            outcome = f"killed at {kill[0]} + {kill[1]:.1f} s" if code is None else f"exited {code}"
            print(f"life {len(lives)}: {outcome}, ran {seconds:.1f} s", flush=True)
            if code is not None and code > 0:
                print(f"mopd-serve failed; see {logs_dir}", file=sys.stderr)
                return 1
            if code is not None and code < 0:
                # A signal this script did not send; the restart that follows covers it like a kill.
                print(f"life {len(lives)}: ended by signal {-code} from outside this run", file=sys.stderr)
            if kills >= 4 * args.restarts:
                break
        schedule.stop()

        # 4. The last start runs to the end of the input.
        code, seconds = run_life(command, env, logs_dir / f"serve-{len(lives):03d}.log", kill=None, timeout=300)
        lives.append({"killed": False, "exit": code, "seconds": round(seconds, 1), "point": None})
        print(f"final life: exited {code} after {seconds:.1f} s", flush=True)
    finally:
        if schedule is not None:
            schedule.stop()
        for proxy in proxies.values():
            proxy.stop()
        for server in servers:
            server.stop()

    # 5. Count.
    figures = account(data_path, state_dir)
    figures["restarts"] = sum(1 for life in lives if life["killed"])
    figures["kills_in_start_up"] = sum(1 for life in lives if life["killed"] and life["point"] == "start")
    figures["outages"] = {route: proxy.counters.outages for route, proxy in sorted(proxies.items())}
    figures["storms"] = {route: proxy.counters.storms for route, proxy in sorted(proxies.items())}
    figures["injected_errors"] = {route: proxy.counters.injected for route, proxy in sorted(proxies.items())}
    figures["final_exit"] = code
    # What the service logged about the faults: breaker opens and HTTP retries, over all lives.
    logged = b"".join(path.read_bytes() for path in sorted(logs_dir.glob("serve-*.log")))
    figures["breaker_opens"] = logged.count(b'"teacher_breaker_opened"')
    figures["http_retries"] = logged.count(b'"http_call_retry"')
    figures["secret_leaks"] = secret_leaks([state_dir, logs_dir])
    figures["seconds"] = round(time.monotonic() - started, 1)

    problems = []
    if figures["rows_lost"] or figures["rows_trained_twice"] or figures["rows_ended_twice"]:
        problems.append("rows lost or ended twice")
    if figures["restarts"] < args.restarts:
        problems.append(f"only {figures['restarts']} restarts")
    if min(figures["outages"].values()) < 1:
        problems.append("a teacher had no outage")
    if figures["secret_leaks"]:
        problems.append("the API key leaked")
    if code != 0:
        problems.append(f"the final run exited with {code}")
    for problem in problems:
        print(f"chaos: {problem}", file=sys.stderr)
    print(orjson.dumps(figures).decode(), flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    sys.exit(main())
