"""What one remote trial costs: Redis commands per trial, and no-op trials per second.

    uv run python -m benchmarks.trial_cost [--trials 1000] [--workers 2] [--concurrency 8]
        [--daemon journal|memory]

Starts a private embedded redis-server and `optuna-rq workers`, runs a no-op study with the
RandomSampler through the remote Optimizer (or, with --daemon, through `optuna-rq broker` on its
default journal file or in memory, cap 2: `benchmarks.daemon_storage`), and reads
`INFO commandstats` before and after.
"""

from __future__ import annotations

import argparse
import time

import optuna
import redis

from benchmarks.redis_server import embedded_redis
from benchmarks.run import OurWorkers
from optuna_rq import Optimizer, suggest
from optuna_rq.plumbing.connection import connect


def command_calls(conn: redis.Redis) -> dict[str, int]:
    return {name: stats["calls"] for name, stats in conn.info("commandstats").items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--daemon", choices=["journal", "memory"], default=None)
    args = parser.parse_args()
    if args.daemon is not None:
        args.concurrency = 2  # what benchmarks.daemon_storage runs

    with embedded_redis("bench") as url:
        conn = connect(url)
        workers = OurWorkers(url, args.workers)
        try:
            optuna.logging.set_verbosity(optuna.logging.WARNING)
            if args.daemon is not None:
                before, elapsed, after = _through_the_daemon(url, workers, args.daemon, args.trials)
                return _print(args, before, elapsed, after)
            study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
            opt = Optimizer(
                "benchmarks.objectives:noop",
                concurrency=args.concurrency,
                n_trials=args.trials,
                study=study,
                connection=conn,
                prefix=workers.queue,
            )
            before = command_calls(conn)
            started = time.perf_counter()
            opt.run(x=suggest.float(0, 1))
            elapsed = time.perf_counter() - started
            after = command_calls(conn)
        finally:
            workers.stop()

    _print(args, before, elapsed, after)


def _through_the_daemon(
    url: str, workers: OurWorkers, storage: str, n_trials: int
) -> tuple[dict[str, int], float, dict[str, int]]:
    from benchmarks.daemon_storage import STORAGES, _Broker, _daemon_study

    broker = _Broker(url, workers.queue, STORAGES[storage])
    try:
        conn = broker.client.connection
        before = command_calls(conn)
        elapsed = n_trials / _daemon_study(broker, n_trials)["trials_per_s"]
        return before, elapsed, command_calls(conn)
    finally:
        broker.stop()


def _print(
    args: argparse.Namespace, before: dict[str, int], elapsed: float, after: dict[str, int]
) -> None:
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    delta = {k: v for k, v in delta.items() if v > 0}
    total = sum(delta.values())
    through = "" if args.daemon is None else f", the daemon on {args.daemon}"
    print(
        f"{args.trials} no-op trials, {args.workers} workers, concurrency {args.concurrency}"
        f"{through}"
    )
    print(f"  {args.trials / elapsed:.0f} trials/s ({elapsed:.2f}s)")
    print(f"  {total / args.trials:.1f} Redis commands per trial (INFO commandstats delta)")
    for name, calls in sorted(delta.items(), key=lambda kv: -kv[1]):
        print(f"    {name:<28} {calls / args.trials:6.2f}")


if __name__ == "__main__":
    main()
