"""Build, cache and load the demo assets.

A finished asset directory contains ``manifest.json``. The build writes it
last into a staging directory and then renames the whole directory into
place under a file lock, so readers never see a half-built directory and two
processes never build into the same one.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import shutil
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import torch
import transformers
from filelock import FileLock
from transformers import AutoTokenizer, PreTrainedTokenizerBase, Qwen2ForCausalLM

from mopd.demo.evaluate import greedy_accuracy
from mopd.demo.models import ModelShape, TrainingPlan, build_model, save_model, train_supervised
from mopd.demo.tasks import (
    ARITHMETIC_ROUTE,
    MATH_ROUTE,
    ROUTES,
    DemoData,
    Problem,
    build_datasets,
    plan_datasets,
    read_jsonl,
)
from mopd.demo.tokenizer import save_tokenizer

log = structlog.get_logger(__name__)

BUILD_VERSION = "8"
"""Bump when the recipe or the layout changes, so caches of older builds are not reused."""

MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
STUDENT_DIR = "student"
TEACHERS_DIR = "teachers"
TRAIN_FILE = "data/train.jsonl"
HELDOUT_FILE = "data/heldout.jsonl"

BUILD_WORKERS = 2
"""Processes that train models at once, one torch thread each: one per core
of a 2-core machine. The two teachers start first and the student takes the
core of whichever teacher finishes first (multiplication, in about a minute)."""

DATA_SEED = 1234
MODEL_SHAPE = ModelShape()
TEACHER_PLANS = {
    ARITHMETIC_ROUTE: TrainingPlan(steps=2000, batch_size=64, learning_rate=2e-3, seed=11),
    MATH_ROUTE: TrainingPlan(steps=2000, batch_size=64, learning_rate=2e-3, seed=12),
}
TEACHER_INIT_SEEDS = {ARITHMETIC_ROUTE: 21, MATH_ROUTE: 22}
TEACHER_CHECK_EVERY = 50
TEACHER_DEV_TARGET = {ARITHMETIC_ROUTE: 0.98, MATH_ROUTE: 0.97}
STUDENT_INIT_SEED = 31
# No label smoothing: a smoothed student spreads mass over the whole vocabulary,
# so at temperature 1 most of its samples contain stray bytes and on-policy
# distillation spends its steps removing them instead of fixing answers.
STUDENT_PLAN = TrainingPlan(steps=1000, batch_size=64, learning_rate=2e-3, seed=32)
STUDENT_CHECK_EVERY = 10
STUDENT_ROUTE_ORDER = (ARITHMETIC_ROUTE, MATH_ROUTE)
STUDENT_DEV_TARGET = {ARITHMETIC_ROUTE: 0.2, MATH_ROUTE: 0.3}
"""Dev accuracy at which a route's supervised training ends. Addition keeps
training while multiplication catches up, so it ends higher."""
DEV_ROWS_PER_ROUTE = 100


@dataclass(frozen=True)
class DemoAssets:
    """Paths of one demo asset directory and the facts recorded when it was built."""

    root: Path
    tokenizer_dir: Path
    student_dir: Path
    teacher_dirs: dict[str, Path]
    """Route -> teacher model directory."""
    train_path: Path
    heldout_path: Path
    manifest: dict
    """Build facts: version, seeds, held-out accuracies, seconds per stage."""


def default_cache_dir() -> Path:
    """Return ``$MOPD_DEMO_DIR`` when set, else ``~/.cache/mopd/demo-<BUILD_VERSION>``."""
    configured = os.environ.get("MOPD_DEMO_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "mopd" / f"demo-{BUILD_VERSION}"


def _assets_at(root: Path, manifest: dict) -> DemoAssets:
    return DemoAssets(
        root=root,
        tokenizer_dir=root / TOKENIZER_DIR,
        student_dir=root / STUDENT_DIR,
        teacher_dirs={route: root / TEACHERS_DIR / route for route in ROUTES},
        train_path=root / TRAIN_FILE,
        heldout_path=root / HELDOUT_FILE,
        manifest=manifest,
    )


def _read_manifest(root: Path) -> dict | None:
    try:
        with (root / MANIFEST_NAME).open(encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def load_demo(directory: Path) -> DemoAssets:
    """Return the assets of a finished directory.

    Raises FileNotFoundError when ``directory`` has no readable manifest,
    which is the case while it is still being built.
    """
    manifest = _read_manifest(directory)
    if manifest is None:
        raise FileNotFoundError(f"no readable {MANIFEST_NAME} in demo directory {directory}")
    return _assets_at(directory, manifest)


def _fsync_directory(directory: Path) -> None:
    # Makes a rename inside the directory durable. Some platforms cannot open
    # a directory, and there the rename is as durable as the OS makes it.
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _write_manifest(root: Path, manifest: Mapping[str, Any]) -> None:
    """Write the manifest through a temporary file, fsync it and rename it into place."""
    temporary = root / f".{MANIFEST_NAME}.tmp"
    with temporary.open("w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, root / MANIFEST_NAME)
    _fsync_directory(root)


@contextmanager
def _torch_build_settings() -> Iterator[None]:
    # The build changes process-wide torch settings only while it runs.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # Flushing denormal floats to zero avoids slow CPU paths once gradients get tiny.
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(previous_threads)


def _base_manifest(*, trained: bool) -> dict[str, Any]:
    return {
        "version": BUILD_VERSION,
        "trained": trained,
        "routes": list(ROUTES),
        "seeds": {
            "data": DATA_SEED,
            "teacher_init": dict(TEACHER_INIT_SEEDS),
            "teacher_data_order": {route: plan.seed for route, plan in TEACHER_PLANS.items()},
            "student_init": STUDENT_INIT_SEED,
            "student_data_order": STUDENT_PLAN.seed,
        },
        "model_shape": {
            "hidden_size": MODEL_SHAPE.hidden_size,
            "num_hidden_layers": MODEL_SHAPE.num_hidden_layers,
            "num_attention_heads": MODEL_SHAPE.num_attention_heads,
            "intermediate_size": MODEL_SHAPE.intermediate_size,
        },
        "workers": BUILD_WORKERS,
        "torch_threads_per_worker": 1,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
    }


def _write_common(directory: Path) -> tuple[PreTrainedTokenizerBase, DemoData]:
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = save_tokenizer(directory=directory / TOKENIZER_DIR)
    data = build_datasets(train_path=directory / TRAIN_FILE, heldout_path=directory / HELDOUT_FILE, seed=DATA_SEED)
    return tokenizer, data


def build_untrained(directory: Path) -> DemoAssets:
    """Write the demo layout with random-init models into ``directory`` in a few seconds.

    The models have the real shape and tokenizer but were never trained, so
    their answers are noise. Meant for tests that need loadable models.
    """
    started = time.monotonic()
    with _torch_build_settings():
        tokenizer, _ = _write_common(directory)
        save_model(
            model=build_model(tokenizer=tokenizer, shape=MODEL_SHAPE, seed=STUDENT_INIT_SEED),
            tokenizer=tokenizer,
            directory=directory / STUDENT_DIR,
        )
        for route in ROUTES:
            save_model(
                model=build_model(tokenizer=tokenizer, shape=MODEL_SHAPE, seed=TEACHER_INIT_SEEDS[route]),
                tokenizer=tokenizer,
                directory=directory / TEACHERS_DIR / route,
            )
    manifest = _base_manifest(trained=False)
    manifest["seconds"] = {"total": round(time.monotonic() - started, 2)}
    _write_manifest(directory, manifest)
    return _assets_at(directory, manifest)


def _heldout_rows(data: DemoData, route: str) -> list[Mapping[str, Any]]:
    return [row for row in data.heldout_rows if row["teacher"] == route]


def _route_accuracies(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerBase, data: DemoData, routes: Sequence[str]
) -> dict[str, float]:
    return {route: round(greedy_accuracy(model, tokenizer, _heldout_rows(data, route)), 4) for route in routes}


def _dev_and_fit(data: DemoData, route: str) -> tuple[list[Mapping[str, Any]], tuple[Problem, ...]]:
    """Split a route's training pool into dev rows, which decide when to stop, and problems to fit.

    Dev problems are never fitted, so the stopping accuracy estimates the
    held-out accuracy without looking at the held-out file.
    """
    pool = data.splits[route].train
    dev = [problem.to_row() for problem in pool[:DEV_ROWS_PER_ROUTE]]
    return dev, pool[DEV_ROWS_PER_ROUTE:]


def _train_teacher(
    *, route: str, tokenizer: PreTrainedTokenizerBase, data: DemoData, directory: Path
) -> tuple[dict[str, Any], float]:
    model = build_model(tokenizer=tokenizer, shape=MODEL_SHAPE, seed=TEACHER_INIT_SEEDS[route])
    dev_rows, fit_problems = _dev_and_fit(data, route)
    dev_history: list[float] = []

    def active_routes(step: int) -> Collection[str]:
        dev_history.append(greedy_accuracy(model, tokenizer, dev_rows))
        return () if dev_history[-1] >= TEACHER_DEV_TARGET[route] else (route,)

    # Teachers fit every non-held-out problem of their route, not only the
    # rows of the training file, so they learn the operation rather than a list.
    result = train_supervised(
        model=model,
        tokenizer=tokenizer,
        problems_by_route={route: fit_problems},
        plan=TEACHER_PLANS[route],
        name=route,
        check_every=TEACHER_CHECK_EVERY,
        active_routes=active_routes,
        log_progress=False,
    )
    accuracy = _route_accuracies(model, tokenizer, data, ROUTES)
    save_model(model=model, tokenizer=tokenizer, directory=directory / TEACHERS_DIR / route)
    facts = {"heldout": accuracy, "dev": dev_history[-1] if dev_history else None, "steps": result.steps}
    return facts, result.seconds


def _train_student(
    *, tokenizer: PreTrainedTokenizerBase, data: DemoData, directory: Path
) -> tuple[dict[str, Any], float]:
    model = build_model(tokenizer=tokenizer, shape=MODEL_SHAPE, seed=STUDENT_INIT_SEED)
    splits = {route: _dev_and_fit(data, route) for route in ROUTES}
    stopped_at: dict[str, int] = {}

    def active_routes(step: int) -> Collection[str]:
        # Routes join the mix one by one, the slow one (addition) first, and
        # training ends when the newest reaches the target. A route that left
        # the mix would be forgotten, and multiplication, learned in a few
        # dozen steps, would race far past the target if it trained from the start.
        for position, route in enumerate(STUDENT_ROUTE_ORDER):
            if route in stopped_at:
                continue
            if greedy_accuracy(model, tokenizer, splits[route][0]) >= STUDENT_DEV_TARGET[route]:
                stopped_at[route] = step
                continue
            return STUDENT_ROUTE_ORDER[: position + 1]
        return []

    result = train_supervised(
        model=model,
        tokenizer=tokenizer,
        problems_by_route={route: fit for route, (_, fit) in splits.items()},
        plan=STUDENT_PLAN,
        name="student",
        check_every=STUDENT_CHECK_EVERY,
        active_routes=active_routes,
        log_progress=False,
    )
    accuracy = _route_accuracies(model, tokenizer, data, ROUTES)
    save_model(model=model, tokenizer=tokenizer, directory=directory / STUDENT_DIR)
    return {"heldout": accuracy, "stopped_at_step": stopped_at, "steps": result.steps}, result.seconds


STUDENT_JOB = "student"


def _run_training_job(job: str, directory: str) -> tuple[dict[str, Any], float]:
    """Train one model in a worker process: ``job`` is a route's teacher or ``STUDENT_JOB``."""
    # One thread per worker: OpenMP threads spin badly when other processes
    # share the cores, and a single thread sums floats in the same order on
    # every machine, so the weights do not depend on the core count.
    torch.set_num_threads(1)
    # Flushing denormal floats to zero avoids slow CPU paths once gradients get tiny.
    torch.set_flush_denormal(True)
    cpu_started = time.process_time()
    root = Path(directory)
    tokenizer = AutoTokenizer.from_pretrained(root / TOKENIZER_DIR)
    data = plan_datasets(seed=DATA_SEED)
    if job == STUDENT_JOB:
        facts, seconds = _train_student(tokenizer=tokenizer, data=data, directory=root)
    else:
        facts, seconds = _train_teacher(route=job, tokenizer=tokenizer, data=data, directory=root)
    # CPU time measures the job's cost even when other processes share the cores.
    facts["cpu_seconds"] = round(time.process_time() - cpu_started, 1)
    return facts, seconds


def build_trained(directory: Path) -> DemoAssets:
    """Train and write all demo assets into ``directory``, writing the manifest last.

    The three models train in ``BUILD_WORKERS`` spawned processes, teachers first. Callers
    that share a cache should use ``ensure_demo``, which builds in a staging
    directory under a lock.
    """
    started = time.monotonic()
    log.info("demo_build_started", directory=str(directory), version=BUILD_VERSION, workers=BUILD_WORKERS)
    with _torch_build_settings():
        _write_common(directory)
    jobs = [*ROUTES, STUDENT_JOB]
    results: dict[str, tuple[dict[str, Any], float]] = {}
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=BUILD_WORKERS, mp_context=context) as pool:
        futures = {pool.submit(_run_training_job, job, str(directory)): job for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            facts, seconds = results[job] = future.result()
            if job == STUDENT_JOB:
                log.info(
                    "demo_student_trained", accuracy=facts["heldout"], steps=facts["steps"], seconds=round(seconds, 1)
                )
            else:
                log.info(
                    "demo_teacher_trained",
                    route=job,
                    accuracy=facts["heldout"][job],
                    other_route_accuracy={route: value for route, value in facts["heldout"].items() if route != job},
                    steps=facts["steps"],
                    seconds=round(seconds, 1),
                )
    seconds = {job: round(result[1], 1) for job, result in results.items()}
    seconds["total"] = round(time.monotonic() - started, 1)
    teacher_facts = {route: results[route][0] for route in ROUTES}
    student_facts = results[STUDENT_JOB][0]
    manifest = _base_manifest(trained=True)
    manifest["accuracy"] = {
        "metric": "greedy exact match of the Final: answer on the held-out file",
        "heldout_rows_per_route": len(read_jsonl(directory / HELDOUT_FILE)) // len(ROUTES),
        "teachers": {route: facts["heldout"][route] for route, facts in teacher_facts.items()},
        "student": student_facts["heldout"],
    }
    manifest["training"] = {"teachers": teacher_facts, "student": student_facts}
    manifest["seconds"] = seconds
    _write_manifest(directory, manifest)
    log.info("demo_build_finished", directory=str(directory), seconds=seconds["total"])
    return _assets_at(directory, manifest)


def _is_current(manifest: Mapping[str, Any] | None) -> bool:
    return manifest is not None and manifest.get("version") == BUILD_VERSION and manifest.get("trained") is True


def ensure_demo(cache_dir: Path | None = None) -> DemoAssets:
    """Return the trained demo assets, building them first when the cache has none.

    ``cache_dir`` defaults to ``default_cache_dir()``. A directory without a
    manifest, or with one from another build version, is rebuilt. Concurrent
    callers wait on a lock file next to the directory, and only one builds.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    manifest = _read_manifest(root)
    if _is_current(manifest):
        return _assets_at(root, manifest)
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{root.name}.lock")):
        # Another process may have finished the build while this one waited.
        manifest = _read_manifest(root)
        if _is_current(manifest):
            return _assets_at(root, manifest)
        staging = root.parent / f".{root.name}.staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            build_trained(staging)
            if root.exists():
                log.info("demo_replacing_incomplete_build", directory=str(root))
                shutil.rmtree(root)
            os.replace(staging, root)
            _fsync_directory(root.parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return load_demo(root)
