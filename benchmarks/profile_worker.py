"""Where a worker's time goes per no-op trial: a cProfile of one worker, grouped by package.

    uv run python -m benchmarks.profile_worker [--trials 1000]

Enqueues `--trials` no-op trials through the real dispatcher (no worker running yet), then runs
one `TrialWorker` in this process, in burst mode, under cProfile, and prints the worker's own
time (tottime) by package and the top functions. The broker then tells every result, so the
run is checked end to end.
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing
import multiprocessing.connection
import pstats
import threading
import time
from collections import defaultdict
from pathlib import Path

import optuna

from benchmarks.redis_server import embedded_redis
from optuna_rq.dispatch import Budget, Dispatcher, RunSpec, StudyRun
from optuna_rq.plumbing.connection import connect
from optuna_rq.protocol import DEFAULT_LEASE_TTL_S, Keys, trial_queue
from optuna_rq.protocol.queue import MsgpackSerializer
from optuna_rq.space.declarations import suggest
from optuna_rq.workers import context, loader
from optuna_rq.workers.child_messages import ChildChannel
from optuna_rq.workers.rq_worker import TrialWorker


def _package(filename: str) -> str:
    for marker in ("site-packages/", "lib/python3"):
        if marker in filename:
            rest = filename.split(marker, 1)[1].lstrip("/")
            if marker == "lib/python3":
                return "stdlib"
            return rest.split("/", 1)[0].removesuffix(".py")
    if "/broker/" in filename or "/workers/" in filename or "/benchmarks/" in filename:
        return "optuna-rq"
    return "built-in (C: sockets, msgpack, time)" if filename.startswith("~") else filename


def _drain(reader: multiprocessing.connection.Connection) -> None:
    while True:
        reader.recv()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with embedded_redis("prof") as url:
        conn = connect(url)
        queue = f"prof-{time.monotonic_ns()}"
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler())
        dispatcher = Dispatcher(conn, prefix=queue, reply_to=f"{queue}:results")
        run = StudyRun(
            study=study,
            spec=RunSpec(
                objective="benchmarks.objectives:noop",
                inputs={"x": suggest.float(0, 1)},
                concurrency=args.trials,
            ),
            budget=Budget(args.trials),
        )
        dispatcher.add(run)
        dispatcher.refill()  # every trial enqueued before the worker starts

        # As in a pool: the attempt notices go to a supervisor (here a thread that reads them).
        reader, writer = multiprocessing.Pipe(duplex=False)
        threading.Thread(target=_drain, args=(reader,), daemon=True).start()
        context.install(
            context.WorkerContext(
                served=loader.serve(["benchmarks.objectives"]),
                channel=ChildChannel(writer),
                lease_ttl_s=DEFAULT_LEASE_TTL_S,
            )
        )
        worker = TrialWorker(
            [trial_queue(conn, Keys(queue).trial_queue("benchmarks.objectives"))],
            connection=conn,
            serializer=MsgpackSerializer,
        )
        profile = cProfile.Profile()
        started = time.perf_counter()
        profile.enable()
        worker.work(burst=True, logging_level="WARNING")
        profile.disable()
        wall = time.perf_counter() - started
        while not run.done:
            dispatcher.poll(0.1)
        assert sum(t.state.name == "COMPLETE" for t in study.trials) == args.trials

    stats = pstats.Stats(profile)
    by_package: dict[str, float] = defaultdict(float)
    rows = []
    entries = stats.stats.items()  # type: ignore[attr-defined]
    for (filename, line, name), (_cc, _nc, tottime, _ct, _callers) in entries:
        by_package[_package(filename)] += tottime
        rows.append((tottime, f"{_package(filename)}: {name} ({Path(filename).name}:{line})"))
    total = sum(by_package.values())
    per_trial_ms = wall * 1000 / args.trials
    print(f"{args.trials} no-op trials, one worker in-process: {per_trial_ms:.2f} ms per trial")
    print("worker time by package (tottime), per trial:")
    for package, seconds in sorted(by_package.items(), key=lambda kv: -kv[1]):
        share = seconds / total
        if share >= 0.01:
            print(f"  {share:6.1%}  {seconds * 1000 / args.trials:6.3f} ms  {package}")
    print("top functions:")
    for seconds, where in sorted(rows, reverse=True)[:15]:
        print(f"  {seconds * 1000 / args.trials:6.3f} ms  {where}")


if __name__ == "__main__":
    main()
