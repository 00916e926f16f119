"""Prometheus metrics of one service instance.

Each service owns a registry, so tests can run several services in one
process. The route is always a label, never part of a metric name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from mopd.httpserver import OpsServer
    from mopd.status import ServiceStatus

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The metric families the service exports, under the ``mopd_`` prefix."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry

        # per route
        self.route_scored = Counter(
            "mopd_teacher_route_scored", "Groups scored by each route's teacher.", ["route"], registry=r
        )
        self.route_inflight = Gauge(
            "mopd_teacher_route_inflight", "Scoring requests in flight per route.", ["route"], registry=r
        )
        self.route_failures = Counter(
            "mopd_teacher_route_failures", "Samples a route's teacher failed to score, by reason.",
            ["route", "reason"], registry=r,
        )
        self.route_latency = Histogram(
            "mopd_teacher_route_latency_seconds", "Teacher scoring latency per request.", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.route_queue_depth = Gauge(
            "mopd_teacher_route_queue_depth", "Groups waiting for each route's teacher pool.", ["route"], registry=r
        )
        self.route_trained_tokens = Counter(
            "mopd_teacher_route_trained_tokens", "Completion tokens trained per route.", ["route"], registry=r
        )
        self.reverse_kl = Gauge(
            "mopd_reverse_kl", "Mean per-token sampled reverse KL of the last step, per route.", ["route"], registry=r
        )
        self.topk_mass = Gauge(
            "mopd_topk_mass", "Mean probability the teachers' top-K candidates held (weighted over teachers), "
            "last step, topk_forward_kl only.", ["route"], registry=r,
        )
        self.topk_entropy = Gauge(
            "mopd_topk_entropy", "Mean entropy of the blended top-K targets in nats, last step, topk_forward_kl only.",
            ["route"], registry=r,
        )
        self.eval_accuracy = Gauge(
            "mopd_eval_accuracy", "Held-out greedy exact-match accuracy of the student at the last evaluation.",
            ["route"], registry=r,
        )
        self.eval_trace_logprob_gap = Gauge(
            "mopd_eval_trace_logprob_gap", "Mean per-token logprob of greedy teacher traces under the teacher and "
            "its prompt minus under the student and the student prompt, at the last evaluation.",
            ["route"], registry=r,
        )
        self.teacher_nll = Gauge(
            "mopd_teacher_nll", "Mean per-token teacher NLL of the last step, per route.", ["route"], registry=r
        )
        self.student_nll = Gauge(
            "mopd_student_nll", "Mean per-token student NLL of the last step, per route.", ["route"], registry=r
        )

        # student
        self.student_window = Gauge(
            "mopd_student_concurrency_window", "Current limit of concurrent student requests.", registry=r
        )
        self.student_inflight = Gauge("mopd_student_inflight", "Student requests in flight.", registry=r)
        self.student_latency = Histogram(
            "mopd_student_latency_seconds", "Student sampling latency per request.", buckets=LATENCY_BUCKETS,
            registry=r,
        )

        self.student_window_debt = Gauge(
            "mopd_student_concurrency_debt",
            "Student requests in flight above the window after a decrease; their releases free no slot.",
            registry=r,
        )
        self.student_window_adjustments = Counter(
            "mopd_student_concurrency_adjustments",
            "Changes of the adaptive student window, by direction and reason.", ["direction", "reason"],
            registry=r,
        )
        self.student_baseline_latency = Gauge(
            "mopd_student_baseline_latency_seconds",
            "Uncongested student latency estimate of the adaptive window.", registry=r,
        )
        self.student_queue_signal = Histogram(
            "mopd_student_queue_signal_seconds", "Seconds student requests waited in the server's queue, "
            "as reported by the server.", buckets=LATENCY_BUCKETS, registry=r,
        )

        # route admission
        self.route_credits = Gauge(
            "mopd_teacher_route_credits", "Free admission credits per route: rows that may still enter sampling.",
            ["route"], registry=r,
        )
        self.route_stalled = Gauge(
            "mopd_teacher_route_stalled", "1 while a route's teacher is marked stalled, else 0.", ["route"],
            registry=r,
        )

        # pipeline
        self.queue_depth = Gauge("mopd_queue_depth", "Items waiting in each queue between stages.", ["queue"],
                                 registry=r)
        self.rows_read = Counter("mopd_rows_read", "Input lines read.", registry=r)
        self.rows_rejected = Counter("mopd_rows_rejected", "Rows written to the rejects file, by reason.",
                                     ["reason"], registry=r)
        self.samples_rejected = Counter(
            "mopd_samples_rejected", "Samples not trained, by reason.", ["route", "reason"], registry=r
        )
        self.rows_trained = Counter("mopd_rows_trained", "Rows whose samples reached an optimizer step.",
                                    ["route"], registry=r)
        self.rows_dead_lettered = Counter(
            "mopd_rows_dead_lettered", "Rows written to the dead-letter file, by route and reason.",
            ["route", "reason"], registry=r,
        )

        # route resilience
        self.route_outcomes = Counter(
            "mopd_teacher_route_outcomes",
            "Outcomes of scoring a group on a route: scored, failed, retried, parked, budget_exhausted, "
            "dead_lettered.", ["route", "outcome"], registry=r,
        )
        self.route_breaker_state = Gauge(
            "mopd_teacher_route_breaker_state", "Circuit breaker of each route's teacher: 0 closed, 1 open, "
            "2 half-open.", ["route"], registry=r,
        )
        self.rows_parked = Gauge(
            "mopd_teacher_route_parked_rows", "Rows waiting for their route's teacher to come back.", ["route"],
            registry=r,
        )

        # state directory
        self.checkpoints = Counter("mopd_checkpoints", "Commits of the trainer checkpoint and resume cursor.",
                                   registry=r)
        self.checkpoint_seconds = Histogram(
            "mopd_checkpoint_seconds", "Wall time of one checkpoint commit.", buckets=LATENCY_BUCKETS, registry=r,
        )

        # trainer
        self.train_steps = Counter("mopd_train_steps", "Optimizer steps.", registry=r)
        self.policy_version = Gauge("mopd_policy_version", "Policy version of the student weights.", registry=r)
        self.step_seconds = Histogram(
            "mopd_train_step_seconds", "Wall time of one optimizer step including weight publication.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.train_loss = Gauge("mopd_train_loss", "Loss of the last optimizer step.", registry=r)

    def serve(self, *, host: str, port: int, status: ServiceStatus | None = None) -> tuple[OpsServer, int]:
        """Start the HTTP endpoint (/metrics, /healthz, /readyz, /status) in daemon threads.

        :returns: the server and its port.
        """
        from mopd.httpserver import start_server
        from mopd.status import ServiceStatus

        server = start_server(self, status or ServiceStatus(self), host=host, port=port)
        return server, server.port

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Read one sample (0.0 when absent); used by tests and the summary."""
        found = self.registry.get_sample_value(name, labels or {})
        return 0.0 if found is None else found
