"""Prometheus metrics for the broker (`optuna-rq broker --metrics-port P`, served by
`broker_health`).

`optuna_rq_desired_workers{queue}` is the autoscaling signal, one per resource class (`--queue`):
the workers that would keep every active study of that class at its cap (the sum over its studies
of min(cap, trials left)). A capped broker keeps its queues near empty, so queue length alone
says little about how many workers would help. `optuna_rq_live_workers{queue}` counts the workers
whose pool's heartbeat is current.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from optuna_rq.dispatch import DispatchObserver, StudyRun
from optuna_rq.protocol import DEFAULT_QUEUE, FailReason

__all__ = ["BrokerMetrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class BrokerMetrics(DispatchObserver):
    """The broker's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self._reported: set[str] = set()
        self._classes: set[str] = {DEFAULT_QUEUE}
        self.registry = CollectorRegistry()
        r = self.registry
        self.trials = Counter(
            "optuna_rq_trials",
            "Trials ended, by study, final state and failure reason: every way a trial ends "
            "(a result, a lost worker, a cancel, a stop condition, a study's fault).",
            ["study", "state", "reason"],
            registry=r,
        )
        self.outstanding = Gauge(
            "optuna_rq_outstanding_trials",
            "Trials sent to workers and not yet told.",
            ["study"],
            registry=r,
        )
        self.cap = Gauge(
            "optuna_rq_concurrency_cap", "Each study's concurrency cap.", ["study"], registry=r
        )
        self.queue_depth = Gauge("optuna_rq_queue_depth", "Jobs waiting in the queue.", registry=r)
        self.live_workers = Gauge(
            "optuna_rq_live_workers",
            "Workers of live pools (heartbeat current), by resource class.",
            ["queue"],
            registry=r,
        )
        self.desired_workers = Gauge(
            "optuna_rq_desired_workers",
            "Workers that would keep every active study of a resource class at its cap: "
            "sum of min(cap, trials left).",
            ["queue"],
            registry=r,
        )
        self.waiting = Gauge(
            "optuna_rq_studies_waiting_for_workers",
            "Active studies no live worker listens to, by resource class.",
            ["queue"],
            registry=r,
        )
        self.ask_seconds = Histogram(
            "optuna_rq_ask_seconds", "study.ask() latency.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tell_seconds = Histogram(
            "optuna_rq_tell_seconds", "study.tell() latency.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.start_delay_seconds = Histogram(
            "optuna_rq_dispatch_to_start_seconds",
            "From enqueue to the objective starting on a worker.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.result_to_tell_seconds = Histogram(
            "optuna_rq_result_to_tell_seconds",
            "From a worker appending a result to the broker telling it.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.dropped_results = Counter(
            "optuna_rq_dropped_results",
            "Stale or repeated results, acknowledged and ignored.",
            registry=r,
        )
        self.refused_messages = Counter(
            "optuna_rq_refused_messages",
            "Messages refused as invalid, unsigned or mis-signed, by kind.",
            ["kind"],
            registry=r,
        )

    # DispatchObserver

    def asked(self, study: str, ask_s: float) -> None:
        self.ask_seconds.observe(ask_s)

    def ended(
        self,
        study: str,
        state: str,
        reason: FailReason | None,
        *,
        tell_s: float | None = None,
        count: int = 1,
    ) -> None:
        self.trials.labels(
            study=study, state=state, reason="" if reason is None else reason.value
        ).inc(count)
        if tell_s is not None:
            self.tell_seconds.observe(tell_s)

    def delivered(self, *, start_delay_s: float | None, result_age_s: float | None) -> None:
        if start_delay_s is not None and start_delay_s >= 0:
            self.start_delay_seconds.observe(start_delay_s)
        if result_age_s is not None and result_age_s >= 0:
            self.result_to_tell_seconds.observe(result_age_s)

    def dropped(self) -> None:
        self.dropped_results.inc()

    def refused(self, kind: str) -> None:
        self.refused_messages.labels(kind=kind).inc()

    # gauges, set by the daemon each turn

    def update(
        self,
        runs: Iterable[StudyRun],
        *,
        queue_depth: int,
        live_workers: Mapping[str, int],
        guard: Callable[[str], AbstractContextManager[None]] = lambda _name: nullcontext(),
    ) -> None:
        """Set the gauges. `live_workers` maps a resource class to its live workers; a class
        with studies or workers is reported, at 0 once it has neither. Each study's gauges are
        set under `guard` (its fault guard, in the daemon)."""
        desired: dict[str, int] = {}
        waiting: dict[str, int] = {}
        seen = set()
        for run in runs:
            with guard(run.name):
                seen.add(run.name)
                self.outstanding.labels(study=run.name).set(len(run.outstanding))
                self.cap.labels(study=run.name).set(run.spec.concurrency)
                desired[run.spec.queue] = desired.get(run.spec.queue, 0) + max(0, run.demand)
                waiting[run.spec.queue] = waiting.get(run.spec.queue, 0) + run.waiting_for_workers
        for name in self._reported - seen:  # a study that ended stops being reported
            self.outstanding.remove(name)
            self.cap.remove(name)
        self._reported = seen
        # Every class seen once stays reported (at 0): a scaler reads 0, not "no data".
        self._classes.update(desired, live_workers)
        for cls in self._classes:
            self.desired_workers.labels(queue=cls).set(desired.get(cls, 0))
            self.waiting.labels(queue=cls).set(waiting.get(cls, 0))
            self.live_workers.labels(queue=cls).set(live_workers.get(cls, 0))
        self.queue_depth.set(queue_depth)
