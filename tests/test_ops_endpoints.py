"""The operations HTTP endpoint: /metrics, /healthz, /readyz and /status."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from mopd.httpserver import OpsServer, start_server
from mopd.metrics import Metrics
from mopd.status import ServiceStatus


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def status(metrics: Metrics, clock: FakeClock) -> ServiceStatus:
    return ServiceStatus(metrics, clock=clock)


@pytest.fixture
def server(metrics: Metrics, status: ServiceStatus) -> Iterator[OpsServer]:
    running = start_server(metrics, status, host="127.0.0.1", port=0)
    yield running
    running.close()


def get(server: OpsServer, path: str) -> tuple[int, bytes, str]:
    url = f"http://127.0.0.1:{server.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read(), response.headers["Content-Type"]
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(), exc.headers["Content-Type"]


def test_healthz_ok_while_starting(server: OpsServer) -> None:
    code, body, content_type = get(server, "/healthz")
    assert code == 200
    assert content_type == "application/json"
    assert json.loads(body)["phase"] == "starting"


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        pytest.param("starting", 503, id="starting"),
        pytest.param("loading_backends", 503, id="loading"),
        pytest.param("evaluating", 200, id="evaluating"),
        pytest.param("training", 200, id="training"),
        pytest.param("draining", 503, id="draining"),
        pytest.param("finishing", 503, id="finishing"),
        pytest.param("finished", 503, id="finished"),
        pytest.param("failed", 503, id="failed"),
    ],
)
def test_readyz_follows_phase(server: OpsServer, status: ServiceStatus, phase: str, expected: int) -> None:
    status.set_phase(phase)
    code, body, _ = get(server, "/readyz")
    assert code == expected
    assert json.loads(body)["phase"] == phase
    assert json.loads(body)["ready"] is (expected == 200)


def test_metrics_served_on_same_port(server: OpsServer, metrics: Metrics) -> None:
    metrics.route_scored.labels(route="math-teacher").inc(3)
    code, body, content_type = get(server, "/metrics")
    assert code == 200
    assert content_type.startswith("text/plain")
    assert b'mopd_teacher_route_scored_total{route="math-teacher"} 3.0' in body


def test_unknown_path_is_404(server: OpsServer) -> None:
    code, body, _ = get(server, "/nope")
    assert code == 404
    assert "/status" in json.loads(body)["endpoints"]


def test_status_lists_declared_routes(server: OpsServer, metrics: Metrics, status: ServiceStatus) -> None:
    status.set_routes(["arithmetic-teacher", "math-teacher"])
    status.set_phase("training")
    status.set_stage("reader", "running")
    status.set_stage("pool:math-teacher", "finished")
    metrics.rows_read.inc(12)
    metrics.rows_rejected.labels(reason="invalid_json").inc(2)
    metrics.queue_depth.labels(queue="rows").set(5)
    metrics.route_scored.labels(route="math-teacher").inc(4)
    metrics.route_inflight.labels(route="math-teacher").set(2)
    metrics.route_queue_depth.labels(route="math-teacher").set(1)
    metrics.route_credits.labels(route="math-teacher").set(5)
    metrics.route_failures.labels(route="math-teacher", reason="teacher_timeout").inc()
    metrics.route_breaker_state.labels(route="math-teacher").set(1)
    metrics.rows_parked.labels(route="math-teacher").set(7)
    metrics.rows_dead_lettered.labels(route="math-teacher", reason="teacher_unavailable").inc(2)
    metrics.train_steps.inc(3)
    metrics.policy_version.set(3)
    metrics.student_window.set(8)

    code, body, _ = get(server, "/status")
    doc = json.loads(body)

    assert code == 200
    assert doc["phase"] == "training"
    assert doc["stages"] == {"reader": "running", "pool:math-teacher": "finished"}
    assert doc["rows"] == {"read": 12, "rejected": {"invalid_json": 2}, "dead_lettered": 2}
    assert doc["queues"] == {"rows": 5}
    assert doc["student"]["concurrency_window"] == 8
    assert doc["trainer"] == {"steps": 3, "policy_version": 3}
    assert set(doc["routes"]) == {"arithmetic-teacher", "math-teacher"}
    math = doc["routes"]["math-teacher"]
    assert (math["scored"], math["inflight"], math["queue_depth"]) == (4, 2, 1)
    assert math["failures"] == {"teacher_timeout": 1}
    assert math["credits"] == 5
    assert math["stalled"] is False
    assert math["breaker"] == "open"
    assert math["parked_rows"] == 7
    assert doc["routes"]["arithmetic-teacher"]["scored"] == 0
    assert doc["routes"]["arithmetic-teacher"]["breaker"] is None
    assert doc["routes"]["arithmetic-teacher"]["credits"] is None


def test_dispatcher_stall_mark_reported(metrics: Metrics, status: ServiceStatus) -> None:
    status.set_routes(["arithmetic-teacher", "math-teacher"])
    status.set_phase("training")
    metrics.route_stalled.labels(route="math-teacher").set(1)
    metrics.route_stalled.labels(route="arithmetic-teacher").set(0)

    assert status.stalled_routes() == ["math-teacher"]
    assert status.ready


def test_cleared_stall_mark_reported(metrics: Metrics, status: ServiceStatus) -> None:
    status.set_routes(["math-teacher"])
    metrics.route_stalled.labels(route="math-teacher").set(1)
    assert status.stalled_routes() == ["math-teacher"]

    metrics.route_stalled.labels(route="math-teacher").set(0)
    assert status.stalled_routes() == []


def test_progress_age_resets_on_scoring(metrics: Metrics, status: ServiceStatus, clock: FakeClock) -> None:
    status.set_routes(["math-teacher"])
    clock.now += 30.0
    assert status.snapshot()["routes"]["math-teacher"]["seconds_since_progress"] == 30.0

    metrics.route_scored.labels(route="math-teacher").inc()
    assert status.snapshot()["routes"]["math-teacher"]["seconds_since_progress"] == 0.0


def test_readyz_lists_stalled_routes(server: OpsServer, metrics: Metrics, status: ServiceStatus) -> None:
    status.set_routes(["math-teacher"])
    status.set_phase("training")
    metrics.route_stalled.labels(route="math-teacher").set(1)
    code, body, _ = get(server, "/readyz")
    assert code == 200
    assert json.loads(body)["stalled_routes"] == ["math-teacher"]


def test_finished_phase_is_final(status: ServiceStatus) -> None:
    status.set_phase("finished")
    status.set_phase("draining")
    assert status.phase == "finished"


def test_unknown_phase_rejected(status: ServiceStatus) -> None:
    with pytest.raises(ValueError, match="unknown phase 'running'"):
        status.set_phase("running")


def test_metrics_serve_binds_loopback(metrics: Metrics) -> None:
    server, port = metrics.serve(host="127.0.0.1", port=0)
    try:
        assert port > 0
        code, _, _ = get(server, "/healthz")
        assert code == 200
    finally:
        server.close()
