"""Round-trip time of a remote trial's `should_prune` and `suggest_float`, seen by the worker.

    uv run python -m benchmarks.remote_trial_rtt

One worker, an otherwise idle broker (the remote Optimizer), an embedded Redis on a unix socket.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from rq import Worker

from broker import Optimizer
from broker.connection import connect, ensure_embedded, stop_embedded
from workers.pool import trial_queue

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> None:
    state = Path(tempfile.mkdtemp(prefix="orq-rtt-", dir="/tmp"))
    url = ensure_embedded(state)
    conn = connect(url)
    workers = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "broker.cli",
            "--redis-url",
            url,
            "workers",
            "--queue",
            "rtt",
            "--import",
            "benchmarks.objectives",
            "--log-level",
            "WARNING",
        ],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    try:
        while Worker.count(connection=conn, queue=trial_queue(conn, "rtt")) < 1:
            time.sleep(0.05)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        opt = Optimizer("benchmarks.objectives:round_trips", 1, 3, connection=conn, queue="rtt")
        opt.run()
    finally:
        workers.terminate()
        workers.wait(timeout=30)
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
