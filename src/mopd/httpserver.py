"""The operations HTTP endpoint: metrics, health, readiness and status on one port.

    GET /metrics   Prometheus exposition of the service's registry
    GET /healthz   200 while the process runs (liveness)
    GET /readyz    200 when backends are loaded and the pipeline trains, else 503
    GET /status    JSON state of each stage and route (see ``mopd.status``)

prometheus_client's own server serves only metrics, so this module runs a
standard-library ``ThreadingHTTPServer`` in a daemon thread. The handlers only
read the registry and the status object, both of which are thread-safe.
"""

from __future__ import annotations

import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
import structlog
from prometheus_client.exposition import choose_encoder

from mopd.metrics import Metrics
from mopd.status import ServiceStatus

log = structlog.get_logger(__name__)

# Interval of the route progress refresh, so the resolution of seconds_since_progress in /status.
REFRESH_SECONDS = 1.0


class OpsServer(ThreadingHTTPServer):
    """An HTTP server bound to one service's metrics and status."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], metrics: Metrics, status: ServiceStatus) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.metrics = metrics
        self.status = status
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def refresh_status(self) -> None:
        """Refresh route progress once a second until the server is closed."""
        while not self._stopped.wait(REFRESH_SECONDS):
            self.status.refresh()

    def close(self) -> None:
        """Stop serving and release the port."""
        self._stopped.set()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: OpsServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (the name is fixed by BaseHTTPRequestHandler)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send_metrics()
        elif path == "/healthz":
            self._send_json(HTTPStatus.OK, {"status": "ok", "phase": self.server.status.phase})
        elif path == "/readyz":
            self._send_readiness()
        elif path == "/status":
            self._send_json(HTTPStatus.OK, self.server.status.snapshot())
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"no endpoint at {path}",
                                                   "endpoints": ["/metrics", "/healthz", "/readyz", "/status"]})

    def do_HEAD(self) -> None:  # noqa: N802
        self._head_only = True
        self.do_GET()

    def _send_metrics(self) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept"))
        self._send(HTTPStatus.OK, encoder(self.server.metrics.registry), content_type)

    def _send_readiness(self) -> None:
        status = self.server.status
        phase = status.phase
        body = {"ready": status.ready, "phase": phase, "stalled_routes": status.stalled_routes()}
        self._send_json(HTTPStatus.OK if body["ready"] else HTTPStatus.SERVICE_UNAVAILABLE, body)

    def _send_json(self, code: HTTPStatus, body: dict[str, Any]) -> None:
        self._send(code, orjson.dumps(body, option=orjson.OPT_INDENT_2) + b"\n", "application/json")

    def _send(self, code: HTTPStatus, payload: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if not getattr(self, "_head_only", False):
            self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        # Scrapes and probes arrive every few seconds; only failures are worth a log line.
        return

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002
        log.warning("http_request_failed", client=self.client_address[0], message=format % args)


def start_server(metrics: Metrics, status: ServiceStatus, *, host: str, port: int) -> OpsServer:
    """Serve the endpoints on ``host:port`` (port 0 picks a free one) from daemon threads.

    :raises OSError: if the address cannot be bound.
    """
    server = OpsServer((host, port), metrics, status)
    # A short poll interval keeps close() quick.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="mopd-http",
                     daemon=True).start()
    threading.Thread(target=server.refresh_status, name="mopd-status-refresh", daemon=True).start()
    return server
