"""Round-trip time of a remote trial's `should_prune` and `suggest_float`, seen by the worker.

    uv run python -m benchmarks.remote_trial_rtt

One worker, an otherwise idle broker (the remote Optimizer), an embedded Redis on a unix socket.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import optuna

from benchmarks.run import OurWorkers
from broker import Optimizer
from broker.connection import connect, ensure_embedded, stop_embedded


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    state = Path(tempfile.mkdtemp(prefix="orq-rtt-", dir="/tmp"))
    url = ensure_embedded(state)
    workers = OurWorkers(url, 1)
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        opt = Optimizer(
            "benchmarks.objectives:round_trips", 1, 3, connection=connect(url), queue=workers.queue
        )
        opt.run()
    finally:
        workers.stop()
        stop_embedded(state)
        shutil.rmtree(state, ignore_errors=True)
    for attr in ("should_prune_ms", "suggest_ms"):
        samples = sorted(v for t in opt.study.trials for v in t.user_attrs[attr])
        print(
            f"{attr[:-3]:>13}: p50 {percentile(samples, 0.5):.3f} ms, "
            f"p99 {percentile(samples, 0.99):.3f} ms ({len(samples)} calls)"
        )


if __name__ == "__main__":
    main()
