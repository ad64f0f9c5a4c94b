"""The broker daemon's own storage cost: a no-op study through `optuna-rq broker`, on its default
durable storage (the journal file under its state directory) and on `--storage memory`, next to
Optuna native (2 processes on JournalRedis), in one run, as ratios to the anchor.

    uv run python -m benchmarks.daemon_storage [--trials 400] [--reps 1] [--breakdown]

With `--breakdown`, one study on the default storage is also taken apart: CPU per trial of the
broker, the workers and redis-server (psutil), and Redis commands per trial by command (INFO
commandstats): where a no-op trial's cost goes.

`benchmarks.run` calls `daemon_overhead` and renders `daemon_overhead_lines` into its report.
Each repetition runs every system once, in turn; figures are medians. The timed span is the
study's: from the submission until its status says finished (polled every 5 ms), with the broker
and its 2 workers already running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import psutil

from benchmarks.run import ROOT, OurWorkers, _command_calls, _median, native
from optuna_rq import suggest
from optuna_rq.client import BrokerClient
from optuna_rq.connection import connect
from optuna_rq.embedded import ensure_embedded, stop_embedded
from optuna_rq.protocol import StudySpec, StudyState
from optuna_rq.spacefile import space_to_data

__all__ = ["daemon_overhead", "daemon_overhead_lines"]

STORAGES = {"journal": None, "memory": "memory"}
"""The daemon's storages measured: its default (no --storage: the journal file), and memory."""
ASK_AHEAD = 1
"""The default storage again with `--ask-ahead 1`: what sampling before a slot frees buys (the
sampler then sees a trial more than the cap running)."""


class _Broker:
    """`optuna-rq broker` on the workers' prefix, with a state directory of its own."""

    def __init__(self, url: str, prefix: str, storage: str | None) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="orq-bench-daemon-", dir="/tmp"))
        command = [sys.executable, "-m", "optuna_rq.cli", "--redis-url", url, "--prefix", prefix]
        command += ["broker", "--log-level", "WARNING"]
        command += [] if storage is None else ["--storage", storage]
        self.process = subprocess.Popen(
            command,
            env=dict(os.environ, PYTHONPATH=str(ROOT), OPTUNA_RQ_STATE_DIR=str(self.state)),
        )
        self.client = BrokerClient(connect(url), prefix)
        while self.client.broker_holder() is None:
            if self.process.poll() is not None:
                raise RuntimeError(f"the broker exited with {self.process.returncode}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        shutil.rmtree(self.state, ignore_errors=True)


def _daemon_study(broker: _Broker, n_trials: int, *, ask_ahead: int = 0) -> dict[str, float]:
    """Trials per second of one no-op study of `n_trials` on 2 workers, cap 2."""
    spec = StudySpec(
        name=f"daemon-{time.monotonic_ns()}",
        objective="benchmarks.objectives:noop",
        space=space_to_data({"x": suggest.float(0, 1)}),
        n_trials=n_trials,
        concurrency=2,
        sampler="random",
        ask_ahead=ask_ahead,
    )
    started = time.perf_counter()
    broker.client.submit(spec)
    while True:
        status = broker.client.status(spec.name)
        if status is not None and status.state.ended:
            break
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    if status.state is not StudyState.FINISHED or status.complete != n_trials:
        raise RuntimeError(f"the daemon's study did not finish: {status}")
    return {"trials_per_s": n_trials / elapsed}


def daemon_overhead(url: str, reps: int, n_trials: int) -> dict[str, Any]:
    """The daemon on each of `STORAGES` and Optuna native with 2 processes on JournalRedis."""
    systems = {name: (storage, 0) for name, storage in STORAGES.items()}
    systems["journal_ask_ahead"] = (None, ASK_AHEAD)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in [*systems, "native"]}
    for _ in range(reps):
        for name, (storage, ask_ahead) in systems.items():
            workers = OurWorkers(url, 2)
            try:
                broker = _Broker(url, workers.queue, storage)
                try:
                    study = _daemon_study(broker, n_trials, ask_ahead=ask_ahead)
                    runs[name].append(study)
                finally:
                    broker.stop()
            finally:
                workers.stop()
        runs["native"].append(native(url, 2, "noop", n_trials, "random"))
    medians = {name: _median(rows) for name, rows in runs.items()}
    anchor = medians["native"]["trials_per_s"]
    return {
        "n_trials": n_trials,
        **{f"daemon_{name}": medians[name] for name in systems},
        "native_2_processes": medians["native"],
        **{f"daemon_{name}_ratio": medians[name]["trials_per_s"] / anchor for name in systems},
    }


def daemon_overhead_lines(d: dict[str, Any]) -> list[str]:
    """The report's section for `daemon_overhead`'s results."""
    return [
        f"## Overhead, the broker daemon: no-op objective, RandomSampler, 2 workers, "
        f"{d['n_trials']} trials",
        "",
        "| | trials/s | ratio |",
        "|---|---|---|",
        f"| `optuna-rq broker`, default storage (journal file) "
        f"| {d['daemon_journal']['trials_per_s']:.0f} | {d['daemon_journal_ratio']:.2f}x |",
        f"| `optuna-rq broker --storage memory` "
        f"| {d['daemon_memory']['trials_per_s']:.0f} | {d['daemon_memory_ratio']:.2f}x |",
        *(
            [
                f"| default storage, `submit --ask-ahead {ASK_AHEAD}` "
                f"| {d['daemon_journal_ask_ahead']['trials_per_s']:.0f} "
                f"| {d['daemon_journal_ask_ahead_ratio']:.2f}x |"
            ]
            if "daemon_journal_ask_ahead" in d
            else []
        ),
        f"| Optuna native, 2 processes (JournalRedis) "
        f"| {d['native_2_processes']['trials_per_s']:.0f} | 1.00x |",
        "",
        "Timed from the submission until the study's status says finished (polled every 5 ms),",
        "with the broker and its workers already running. Goal: >= 1.5x native, on each storage.",
        f"With `--ask-ahead {ASK_AHEAD}` the broker samples the next trial while the workers run",
        "(the sampler then sees one trial more than the cap running); by default it asks when a",
        "slot frees, so a seeded sampler at cap 1 gives `study.optimize`'s params.",
    ]


def breakdown(url: str, n_trials: int) -> dict[str, Any]:
    """One study on the daemon's default storage, 2 workers: CPU ms per trial of each process
    kind, and Redis commands per trial (all, and the most called)."""
    conn = connect(url)
    redis_server = psutil.Process(int(conn.info("server")["process_id"]))  # type: ignore[index]
    workers = OurWorkers(url, 2)
    try:
        broker = _Broker(url, workers.queue, None)
        try:
            pool = psutil.Process(workers.process.pid)
            processes = {
                "broker": [psutil.Process(broker.process.pid)],
                "workers": [pool, *pool.children(recursive=True)],
                "redis-server": [redis_server],
            }
            cpu = {kind: _cpu_s(ps) for kind, ps in processes.items()}
            calls = _command_calls(conn)
            figures = _daemon_study(broker, n_trials)
            cpu = {k: (_cpu_s(ps) - cpu[k]) * 1000 / n_trials for k, ps in processes.items()}
            after = _command_calls(conn)
        finally:
            broker.stop()
    finally:
        workers.stop()
    per_trial = {
        name.removeprefix("cmdstat_"): (after[name] - calls.get(name, 0)) / n_trials
        for name in after
        if after[name] != calls.get(name, 0)
    }
    return {
        **figures,
        "cpu_ms_per_trial": cpu,
        "redis_commands_per_trial": sum(per_trial.values()),
        "top_commands_per_trial": dict(sorted(per_trial.items(), key=lambda kv: -kv[1])[:12]),
    }


def _cpu_s(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--breakdown", action="store_true", help="where a trial's cost goes")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    state = Path(tempfile.mkdtemp(prefix="orq-bench-", dir="/tmp"))
    url = ensure_embedded(state)
    try:
        results = daemon_overhead(url, args.reps, args.trials)
        parts = breakdown(url, args.trials) if args.breakdown else None
    finally:
        stop_embedded(state)
        shutil.rmtree(state, ignore_errors=True)
    print("\n".join(daemon_overhead_lines(results)))
    if parts is not None:
        print(json.dumps(parts, indent=2))


if __name__ == "__main__":
    main()
