"""Command-line entry points: ``mopd-serve`` and ``mopd``."""

from __future__ import annotations

import argparse
import os
import signal
import sys

import anyio
import structlog

from mopd.errors import ConfigError, MopdError
from mopd.logging import configure_logging
from mopd.metrics import Metrics
from mopd.settings import Settings, load_settings
from mopd.status import ServiceStatus

log = structlog.get_logger("mopd")


async def _serve(settings: Settings) -> int:
    from mopd.app import run

    metrics = Metrics()
    status = ServiceStatus(metrics)
    if settings.metrics_enabled:
        try:
            server, port = metrics.serve(host=settings.metrics_host, port=settings.metrics_port, status=status)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port} ({exc}); set "
                "MOPD_METRICS_PORT to a free port (0 picks one) or MOPD_METRICS_ENABLED=false"
            ) from exc
        log.info("metrics_listening", url=f"http://{settings.metrics_host}:{port}/metrics",
                 endpoints=["/metrics", "/healthz", "/readyz", "/status"])

    stop = anyio.Event()
    forced_by: list[int] = []
    outcome = None
    async with anyio.create_task_group() as tg:

        async def watch_signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                count = 0
                async for signum in signals:
                    count += 1
                    name = signal.Signals(signum).name
                    if count == 1:
                        log.info("stop_requested", signal=name, grace_seconds=settings.shutdown_grace_seconds)
                        stop.set()
                    else:
                        log.warning("stop_forced", signal=name)
                        forced_by.append(signum)
                        tg.cancel_scope.cancel()

        tg.start_soon(watch_signals)
        try:
            outcome = await run(settings, metrics=metrics, stop=stop, status=status)
        except Exception as exc:
            status.set_phase("failed", error=str(exc))
            raise
        tg.cancel_scope.cancel()

    # The signal receiver is closed and the default action would kill the
    # process mid-teardown, so a later signal exits at once with the usual status.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_on_signal)
    if outcome is None:
        # A second signal cancelled the run: no summary, and the state directory
        # resumes from its last commit. Exit as a process killed by that signal.
        return 128 + (forced_by[0] if forced_by else signal.SIGTERM)
    print(outcome.summary_path, flush=True)
    return 0


def _exit_on_signal(signum: int, frame: object) -> None:
    os._exit(128 + signum)


def serve_main(argv: list[str] | None = None) -> int:
    """``mopd-serve``: run the distillation service configured by environment variables."""
    parser = argparse.ArgumentParser(
        prog="mopd-serve",
        description="Routed multi-teacher on-policy distillation. Configured by MOPD_* and DISTILLATION_* "
        "environment variables; with no teacher and no data configured it runs the embedded demo.",
    )
    parser.parse_args(argv)
    try:
        settings = load_settings()
        configure_logging(level=settings.log_level, fmt=settings.log_format)
        log.info("service_starting", demo=settings.is_demo, backend=settings.backend, state_dir=str(settings.state_dir))
        code = anyio.run(_serve, settings)
        log.info("service_stopped", exit_code=code)
        return code
    except BaseExceptionGroup as group:
        leaf = _first_leaf(group)
        if not isinstance(leaf, MopdError):
            raise
        return _report_error(leaf)
    except MopdError as exc:
        return _report_error(exc)


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _report_error(exc: MopdError) -> int:
    if isinstance(exc, ConfigError):
        print(f"mopd-serve: configuration error: {exc}", file=sys.stderr)
        return 2
    log.error("service_failed", error=str(exc))
    print(f"mopd-serve: {exc}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """``mopd``: tools around the service."""
    parser = argparse.ArgumentParser(prog="mopd", description="Tools for the mopd distillation service.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the service (same as mopd-serve)")
    build = sub.add_parser("build-demo", help="build (or reuse) the embedded demo models and data, print their path")
    build.add_argument("--dir", default=None, help="cache directory (default: MOPD_DEMO_DIR or the user cache)")
    env_docs = sub.add_parser("env-docs", help="print the environment-variable reference generated from the settings")
    env_docs.add_argument("--write", action="store_true", help="update docs/configuration.md and the README table")
    env_docs.add_argument("--check", action="store_true", help="exit 1 when those files differ from the settings")
    env_docs.add_argument("--root", default=".", help="repository root holding docs/ and README.md (default: .)")
    check = sub.add_parser(
        "check-data",
        help="report privileged rows whose student prompt leaks the answer or whose teacher prompt lacks it",
    )
    check.add_argument("paths", nargs="+", help="JSONL files or glob patterns of rows")
    check.add_argument("--messages-key", default="teacher_messages",
                       help="row key of the teacher prompt; teacher_messages is the fallback (default: teacher_messages)")
    check.add_argument("--answer-key", default="expected_answer", help="row key of the answer (default: expected_answer)")
    check.add_argument("--route-key", default="teacher", help="row key of the route, shown in findings (default: teacher)")
    report = sub.add_parser("report", help="draw a run's per-route reverse KL, accuracy and throughput into a PNG")
    report.add_argument("state_dir", help="MOPD_STATE_DIR of the run (contains steps.jsonl and summary.json)")
    report.add_argument("--output", default=None, help="PNG path (default: <state_dir>/report.png)")
    server = sub.add_parser(
        "model-server",
        help="serve a local transformers model directory over a vLLM-compatible HTTP subset (for MOPD_BACKEND=openai)",
    )
    server.add_argument("--model", required=True, help="save_pretrained directory of the model")
    server.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    server.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default: 8000)")
    server.add_argument("--served-model-name", default=None,
                        help="model name requests must use (default: the directory name)")
    server.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda or cuda:N (default: auto)")
    server.add_argument("--max-batch-size", type=int, default=64, help="maximum sequences in one batch (default: 64)")
    server.add_argument("--batch-wait-ms", type=float, default=5.0,
                        help="milliseconds the first request of a batch waits for others (default: 5)")
    server.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    server.add_argument("--torch-threads", type=int, default=0, help="CPU threads for torch; 0 keeps the default")
    args = parser.parse_args(argv)

    if args.command == "model-server":
        return _model_server(args)
    if args.command == "serve":
        return serve_main([])
    if args.command == "build-demo":
        from pathlib import Path

        from mopd.demo import ensure_demo

        configure_logging()
        assets = ensure_demo(Path(args.dir) if args.dir else None)
        print(assets.root)
        return 0
    if args.command == "check-data":
        return _check_data(args)
    if args.command == "report":
        from pathlib import Path

        from mopd.report import ReportError, write_report

        try:
            path = write_report(Path(args.state_dir), Path(args.output) if args.output else None)
        except ReportError as exc:
            print(f"mopd report: {exc}", file=sys.stderr)
            return 2
        print(path)
        return 0
    if args.command == "env-docs":
        from mopd.envdocs import env_docs_command

        return env_docs_command(root=args.root, write=args.write, check=args.check)
    return 2


def _check_data(args: argparse.Namespace) -> int:
    """Print one JSON line per finding and a summary on stderr; exit 1 when a row fails."""
    from collections import Counter

    import orjson

    from mopd.datacheck import check_rows
    from mopd.pipeline.reader import expand_sources

    paths = []
    for pattern in args.paths:
        try:
            paths.extend(expand_sources(pattern))
        except MopdError as exc:
            print(f"mopd check-data: {exc}", file=sys.stderr)
            return 2
    findings, counts = check_rows(paths, messages_key=args.messages_key, answer_key=args.answer_key,
                                  route_key=args.route_key)
    for finding in findings:
        print(orjson.dumps(finding.to_json()).decode())
    by_problem = Counter(finding.problem for finding in findings)
    problems = ", ".join(f"{problem}={count}" for problem, count in sorted(by_problem.items()))
    print(f"mopd check-data: {counts['rows']} rows, {counts['privileged']} privileged rows checked, "
          f"{len(findings)} findings{f' ({problems})' if problems else ''}; skipped: "
          f"{counts['skipped_not_privileged']} without a teacher prompt, {counts['skipped_no_answer']} without "
          f"an answer, {counts['skipped_invalid_json']} not a JSON object", file=sys.stderr)
    return 1 if findings else 0


def _model_server(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from mopd.backends.local.models import resolve_device
    from mopd.modelserver.server import run_server

    configure_logging()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    directory = Path(args.model)
    try:
        run_server(
            model_dir=directory, host=args.host, port=args.port,
            served_name=args.served_model_name or directory.resolve().name, device=resolve_device(args.device),
            max_batch_size=args.max_batch_size, batch_wait_seconds=args.batch_wait_ms / 1000.0, seed=args.seed,
        )
    except ConfigError as exc:
        print(f"mopd model-server: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"mopd model-server: cannot listen on {args.host}:{args.port} ({exc}); pick a free port or 0",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
