"""A worker process's own Prometheus metrics: the trials it ran, by outcome, and how long."""

from __future__ import annotations

from optuna_rq.protocol import TrialResult

__all__ = ["WorkerMetrics"]


class WorkerMetrics:
    """Counts trials and their durations, served over HTTP on `port` from construction on.

    Each worker process has a registry and a port of its own (the pool gives worker i
    `metrics_port + i`).
    """

    def __init__(self, port: int) -> None:
        # Imported here: a worker started without metrics never loads it.
        from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

        registry = CollectorRegistry()
        self.trials = Counter(
            "optuna_rq_worker_trials",
            "Trials this worker ran, by outcome and failure reason.",
            ["outcome", "reason"],
            registry=registry,
        )
        self.seconds = Histogram(
            "optuna_rq_worker_trial_seconds",
            "How long objectives ran.",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 1800, 3600),
            registry=registry,
        )
        start_http_server(port, registry=registry)

    def observe(self, result: TrialResult) -> None:
        reason = result.fail_reason.value if result.fail_reason else ""
        self.trials.labels(outcome=result.outcome.value, reason=reason).inc()
        self.seconds.observe(result.duration_s)
