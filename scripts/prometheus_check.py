"""Check that every PromQL query of the Grafana dashboard returns data from a real run.

Steps, all on loopback and all stopped at the end:

1. Install Debian's ``prometheus`` package when the binary is missing (root only).
2. Build random-init student and teacher models and a routed input file with a
   few invalid rows, so the rejects panel has data.
3. Start ``mopd-serve`` on them and wait until it is ready.
4. Start Prometheus with its own config and data directory, scraping mopd every second.
5. Wait for enough scrapes and optimizer steps, then run every query of the
   dashboard through ``/api/v1/query``, with Grafana's variables replaced.

Prints ``N of N dashboard queries returned data`` and exits 1 when any query
returns nothing, 2 when the check could not run.

Usage: python scripts/prometheus_check.py [--dashboard deploy/grafana/mopd.json] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DASHBOARD = REPO / "deploy" / "grafana" / "mopd.json"
INPUT_ROWS = REPO / "tests" / "data" / "gsm8k_routed.jsonl"
ROUTES = ("arithmetic-teacher", "math-teacher")
LOOPBACK = "127.0.0.1"

# Grafana variables and what they become in a direct query. The rate window
# spans many 1 s scrapes, so rate() always has two samples to work with.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "5m", "$route": ".*"}
MIN_SCRAPES = 20
MIN_STEPS = 3
READY_TIMEOUT_SECONDS = 120.0
DATA_TIMEOUT_SECONDS = 120.0


class CheckError(Exception):
    """The check could not run (missing tool, a process that did not start)."""


# --- 1. the prometheus binary ---------------------------------------------------

def ensure_prometheus() -> str:
    """Return the path of the prometheus binary, installing Debian's package when missing.

    :raises CheckError: if it is missing and cannot be installed here.
    """
    found = shutil.which("prometheus")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise CheckError("the prometheus binary is not installed; as root run "
                         "`apt-get update && apt-get install -y prometheus` (Debian) and retry")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]):
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, timeout=600)
    found = shutil.which("prometheus")
    if not found:
        raise CheckError("apt-get installed the prometheus package but no prometheus binary is on PATH")
    return found


# --- 2. models and input ------------------------------------------------------------

def build_models(root: Path) -> None:
    """Write a tokenizer, a student and one teacher per route, all random-init."""
    from mopd.demo.models import ModelShape, build_model, save_model
    from mopd.demo.tokenizer import save_tokenizer

    tokenizer = save_tokenizer(directory=root / "tokenizer")
    shape = ModelShape(hidden_size=64, intermediate_size=128, max_position_embeddings=1024)
    for seed, name in enumerate(("student", *ROUTES)):
        model = build_model(tokenizer=tokenizer, shape=shape, seed=seed)
        save_model(model=model, tokenizer=tokenizer, directory=root / name)


def write_input(path: Path) -> None:
    """Copy the routed GSM8K rows and add two invalid rows in front."""
    invalid = [
        b"{this line is not JSON\n",
        json.dumps({"messages": [{"role": "user", "content": "Solve 1 + 1."}], "teacher": "no-such-teacher"}).encode()
        + b"\n",
    ]
    path.write_bytes(b"".join(invalid) + INPUT_ROWS.read_bytes())


# --- 3 and 4. processes ---------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def http_get(url: str, *, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_until(description: str, ready: Callable[[], bool], *, timeout: float, process: subprocess.Popen) -> None:
    """Poll ``ready()`` every half second until it is true.

    :raises CheckError: if ``process`` exits or ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise CheckError(f"{description}: the process exited with code {process.returncode}")
        try:
            if ready():
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.5)
    raise CheckError(f"{description}: timed out after {timeout:.0f} s")


def start_mopd(work: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MOPD_", "DISTILLATION_", "OPD_"))}
    env.update({
        "MOPD_DATA_PATH": str(work / "rows.jsonl"),
        "DISTILLATION_TEACHERS": ",".join(ROUTES),
        "MOPD_MODEL_ROOT": str(work / "models"),
        "MOPD_STUDENT_MODEL": "student",
        "MOPD_EPOCHS": "0",
        "MOPD_MAX_TOKENS": "8",
        "MOPD_COMPLETIONS_PER_PROMPT": "2",
        "MOPD_PROMPT_GROUPS_PER_STEP": "4",
        "MOPD_TEACHER_WORKERS": "1",
        "MOPD_DEVICE": "cpu",
        "MOPD_STATE_DIR": str(work / "state"),
        "MOPD_METRICS_HOST": LOOPBACK,
        "MOPD_METRICS_PORT": str(port),
        "MOPD_SHUTDOWN_GRACE_SECONDS": "5",
        "MOPD_LOG_FORMAT": "json",
    })
    command = [sys.executable, "-m", "mopd.cli", "serve"]
    with log_path.open("wb") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)


def start_prometheus(binary: str, work: Path, target_port: int, port: int, log_path: Path) -> subprocess.Popen:
    config = work / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        "  - job_name: mopd\n"
        "    static_configs:\n"
        f"      - targets: ['{LOOPBACK}:{target_port}']\n"
    )
    command = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={work / 'tsdb'}",
        f"--web.listen-address={LOOPBACK}:{port}",
        "--log.level=warn",
    ]
    with log_path.open("wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=work)


def stop(process: subprocess.Popen | None, *, grace: float = 20.0) -> None:
    """Send SIGTERM, then SIGKILL after ``grace`` seconds."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


# --- 5. queries -------------------------------------------------------------------------

def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """Return (panel title, expression) for every query target, rows' nested panels included."""

    def walk(panels: list[dict]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            yield from walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield panel.get("title", "?"), target["expr"]

    return list(walk(dashboard.get("panels", [])))


def expand_variables(expr: str) -> str:
    """Replace Grafana's variables with values Prometheus accepts.

    :raises CheckError: if a variable remains that this check does not know.
    """
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    if "$" in expr:
        raise CheckError(f"unknown Grafana variable in {expr!r}; add it to GRAFANA_VARIABLES")
    return expr


def query(prometheus_url: str, expr: str) -> list[dict]:
    """Run an instant query; return its result vector.

    :raises CheckError: if Prometheus rejects the query.
    """
    url = f"{prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    code, body = http_get(url)
    answer = json.loads(body)
    if code != 200 or answer.get("status") != "success":
        raise CheckError(f"Prometheus rejected {expr!r}: {answer.get('error', code)}")
    return answer["data"]["result"]


def scalar(prometheus_url: str, expr: str) -> float:
    result = query(prometheus_url, expr)
    return float(result[0]["value"][1]) if result else 0.0


def run_check(dashboard_path: Path, work: Path) -> int:
    dashboard = json.loads(dashboard_path.read_text())
    queries = [(title, expr, expand_variables(expr)) for title, expr in dashboard_queries(dashboard)]
    if len(queries) < 10:
        raise CheckError(f"{dashboard_path} has {len(queries)} queries; expected at least 10")

    binary = ensure_prometheus()
    print(f"building random-init models under {work}", flush=True)
    build_models(work / "models")
    write_input(work / "rows.jsonl")

    mopd_port, prometheus_port = free_port(), free_port()
    mopd_url = f"http://{LOOPBACK}:{mopd_port}"
    prometheus_url = f"http://{LOOPBACK}:{prometheus_port}"
    mopd = prometheus = None
    try:
        mopd = start_mopd(work, mopd_port, work / "mopd.log")
        wait_until("mopd-serve /readyz", lambda: http_get(f"{mopd_url}/readyz")[0] == 200,
                   timeout=READY_TIMEOUT_SECONDS, process=mopd)
        print(f"mopd-serve ready at {mopd_url}", flush=True)

        prometheus = start_prometheus(binary, work, mopd_port, prometheus_port, work / "prometheus.log")
        wait_until("prometheus /-/ready", lambda: http_get(f"{prometheus_url}/-/ready")[0] == 200,
                   timeout=READY_TIMEOUT_SECONDS, process=prometheus)
        print(f"prometheus ready at {prometheus_url}, scraping every second", flush=True)

        def enough_data() -> bool:
            if mopd.poll() is not None:
                raise CheckError(f"mopd-serve exited with code {mopd.returncode} before enough data was scraped")
            scrapes = scalar(prometheus_url, 'sum(count_over_time(up{job="mopd"}[5m]))')
            steps = scalar(prometheus_url, "max(mopd_train_steps_total)")
            return scrapes >= MIN_SCRAPES and steps >= MIN_STEPS

        wait_until(f"{MIN_SCRAPES} scrapes and {MIN_STEPS} optimizer steps", enough_data,
                   timeout=DATA_TIMEOUT_SECONDS, process=prometheus)

        failed = 0
        for title, expr, expanded in queries:
            series = len(query(prometheus_url, expanded))
            mark = "ok  " if series else "NONE"
            failed += 0 if series else 1
            print(f"{mark} {series:3d} series  {title}: {expr}")
        print(f"{len(queries) - failed} of {len(queries)} dashboard queries returned data", flush=True)
        return 1 if failed else 0
    except CheckError:
        for name in ("mopd.log", "prometheus.log"):
            path = work / name
            if path.exists():
                print(f"--- last lines of {name} ---", file=sys.stderr)
                print("\n".join(path.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr)
        raise
    finally:
        stop(prometheus)
        stop(mopd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dashboard", type=Path, default=DEFAULT_DASHBOARD, help="Grafana dashboard JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory with the logs and the TSDB")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="mopd-prometheus-check-"))
    try:
        return run_check(args.dashboard, work)
    except (CheckError, subprocess.SubprocessError) as exc:
        print(f"prometheus-check: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
