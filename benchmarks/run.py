"""Benchmarks, side by side with the anchor in one run, on one machine and one Redis.

    uv run --extra bench python -m benchmarks.run [--quick] [--reps N] [--only SECTION]

Anchors: Optuna's own distributed mode as users run it today, N processes each calling
`study.optimize` on a shared JournalRedis storage (the same redis-server); flytekitplugins-optuna
1.16 in-process, the API we are a drop-in for (in an environment of its own, made by uv:
benchmarks/flyte_anchor.py); and, for the cost of the queue itself, raw RQ running no-op jobs with
its SimpleWorker and its forking Worker. Writes benchmarks/report.md, benchmarks/report.json and
benchmarks/scaling.png. Every figure is the median of `--reps` repetitions, and each workload
reports its ratio to the anchor.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import psutil
import redis
from rq import Worker

from benchmarks import fleet
from benchmarks.redis_server import embedded_redis
from optuna_rq import Optimizer, suggest
from optuna_rq.plumbing.connection import connect
from optuna_rq.protocol import Keys, trial_queue

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SLEEP_S = 0.05


# -- the two systems under test ------------------------------------------------------------------


class OurWorkers:
    """`optuna-rq workers --count N` on a prefix of its own, ready when every worker
    registered."""

    def __init__(
        self, url: str, count: int, isolation: str = "process", env: dict[str, str] | None = None
    ) -> None:
        self.url, self.count, self.queue = url, count, f"bench{count}-{time.monotonic_ns()}"
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "optuna_rq.cli.app",
                "--redis-url",
                url,
                "--prefix",
                self.queue,
                "workers",
                "--import",
                "benchmarks.objectives",
                "--count",
                str(count),
                "--isolation",
                isolation,
                "--log-level",
                "WARNING",
            ],
            env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})),
        )
        conn = connect(url)
        queue = trial_queue(conn, Keys(self.queue).trial_queue("benchmarks.objectives"))
        while Worker.count(connection=conn, queue=queue) < count:
            time.sleep(0.05)

    def cpu_s(self) -> float:
        """User + system CPU of the pool and its workers, with the work horses they forked and
        waited for (`--isolation fork`)."""
        pool = psutil.Process(self.process.pid)
        total = 0.0
        for process in [pool, *pool.children(recursive=True)]:
            try:
                t = process.cpu_times()
            except psutil.NoSuchProcess:  # a work horse that just ended: its parent counts it
                continue
            total += t.user + t.system + t.children_user + t.children_system
        return total

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def redis_cpu_s(conn: redis.Redis) -> float:
    """User + system CPU of the redis-server `conn` talks to."""
    info = conn.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def ours(
    url: str,
    workers: OurWorkers,
    objective: str,
    n_trials: int,
    sampler: str,
    concurrency: int | None = None,
) -> dict[str, float]:
    conn = connect(url)
    study = optuna.create_study(sampler=_sampler(sampler))
    opt = Optimizer(
        f"benchmarks.objectives:{objective}",
        concurrency=concurrency or workers.count,
        n_trials=n_trials,
        study=study,
        connection=conn,
        prefix=workers.queue,
    )
    before = _command_calls(conn)
    others = workers.cpu_s() + redis_cpu_s(conn)
    cpu, wall = time.process_time(), time.perf_counter()
    opt.run(x=suggest.float(0, 1))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    others = workers.cpu_s() + redis_cpu_s(conn) - others
    commands = sum(_command_calls(conn).values()) - sum(before.values())
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == n_trials
    return {
        "trials_per_s": n_trials / wall,
        "commands_per_trial": commands / n_trials,
        "broker_cpu_ms_per_trial": cpu * 1000 / n_trials,
        "cpu_ms_per_trial": (cpu + others) * 1000 / n_trials,
    }


def _native_process(
    url: str,
    name: str,
    objective: str,
    n_trials: int,
    sampler: str,
    barrier: Any,
    cpu_s: Any,
    index: int,
) -> None:
    from optuna.storages.journal import JournalRedisBackend, JournalStorage

    from benchmarks import objectives

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalRedisBackend(url))
    study = optuna.load_study(study_name=name, storage=storage, sampler=_sampler(sampler))
    fn = getattr(objectives, objective)
    barrier.wait()
    started = time.process_time()
    study.optimize(lambda trial: fn(trial.suggest_float("x", 0, 1)), n_trials=n_trials)
    cpu_s[index] = time.process_time() - started


def native(
    url: str, processes: int, objective: str, n_trials: int, sampler: str
) -> dict[str, float]:
    """The anchor: `processes` processes calling study.optimize on one JournalRedis study. Its
    `cpu_s`: what those processes spent optimizing, each timing itself from the start barrier
    (their interpreters' start and imports are not the study's cost, as a running broker's and
    workers' are not ours)."""
    from optuna.storages.journal import JournalRedisBackend, JournalStorage

    name = f"native-{time.monotonic_ns()}"
    optuna.create_study(study_name=name, storage=JournalStorage(JournalRedisBackend(url)))
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(processes + 1)
    cpu_s = context.Array("d", processes)
    share = [n_trials // processes + (i < n_trials % processes) for i in range(processes)]
    children = [
        context.Process(
            target=_native_process,
            args=(url, name, objective, share[i], sampler, barrier, cpu_s, i),
        )
        for i in range(processes)
    ]
    conn = redis.Redis.from_url(url)
    for child in children:
        child.start()
    barrier.wait()  # time the optimisation, not the interpreters starting
    before, server = _command_calls(conn), redis_cpu_s(conn)
    started = time.perf_counter()
    for child in children:
        child.join()
    wall = time.perf_counter() - started
    server = redis_cpu_s(conn) - server
    commands = sum(_command_calls(conn).values()) - sum(before.values())
    return {
        "trials_per_s": n_trials / wall,
        "cpu_s": sum(cpu_s[:]),
        "cpu_ms_per_trial": (sum(cpu_s[:]) + server) * 1000 / n_trials,
        "commands_per_trial": commands / n_trials,
    }


_RAW_WORKER = """
import sys
from rq import SimpleWorker, Worker, Queue
from redis import Redis
conn = Redis.from_url(sys.argv[1])
cls = SimpleWorker if sys.argv[3] == "simple" else Worker
worker = cls([Queue(sys.argv[2], connection=conn)], connection=conn)
worker.work(logging_level="WARNING")
"""


def raw_rq(
    url: str, workers: int, worker_class: str, n_jobs: int, job: str = "raw_rq_job"
) -> dict[str, float]:
    """The queue's own cost: `workers` plain RQ workers of `worker_class` ("simple" or "fork"),
    started and registered first, then `n_jobs` jobs (pickle, RQ's defaults) enqueued at once;
    timed until the last one counted itself done."""
    from rq import Queue

    conn = redis.Redis.from_url(url)
    queue = Queue(f"raw-{time.monotonic_ns()}", connection=conn)
    done_key = f"{queue.name}:done"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, "-c", _RAW_WORKER, url, queue.name, worker_class]
    processes = [subprocess.Popen(args, env=env) for _ in range(workers)]
    try:
        while Worker.count(connection=conn, queue=queue) < workers:
            time.sleep(0.05)
        started = time.perf_counter()
        with conn.pipeline() as pipe:
            for _ in range(n_jobs):
                queue.enqueue_call(
                    f"benchmarks.objectives.{job}", args=(done_key,), result_ttl=0, pipeline=pipe
                )
            pipe.execute()
        while int(conn.get(done_key) or 0) < n_jobs:
            time.sleep(0.002)
        wall = time.perf_counter() - started
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)
    return {"jobs_per_s": n_jobs / wall}


FLYTE_PLUGIN = "flytekitplugins-optuna==1.16.31"


def flyte_plugin(reps: int, noop_trials: int, counts: list[int]) -> dict[str, Any]:
    """flytekitplugins-optuna in-process, run by benchmarks/flyte_anchor.py in an environment of
    its own (it pins another Optuna); {"skipped": why} where uv or the package is not to be had."""
    uv = shutil.which("uv")
    if uv is None:
        return {"skipped": "uv is not on PATH"}
    command = [uv, "run", "--no-project", "--quiet", "--with", FLYTE_PLUGIN, "python"]
    command += [str(HERE / "flyte_anchor.py"), "--reps", str(reps)]
    command += ["--noop-trials", str(noop_trials), "--workers", ",".join(map(str, counts))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return {"skipped": f"{FLYTE_PLUGIN} did not run: {done.stderr.strip()[-300:]}"}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def in_process(reps: int, n_trials: int) -> dict[str, float]:
    """optuna-rq's Optimizer in-process (no Redis), as flytekitplugins-optuna runs."""

    def once() -> dict[str, float]:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler())

        def objective(trial: optuna.Trial) -> float:
            return trial.suggest_float("x", 0, 1)

        opt = Optimizer(
            objective,
            concurrency=2,
            n_trials=n_trials,
            study=study,
        )
        started = time.perf_counter()
        opt.run()
        return {"trials_per_s": n_trials / (time.perf_counter() - started)}

    return _repeat(reps, once)


def _sampler(name: str) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler() if name == "random" else optuna.samplers.TPESampler()


def _command_calls(conn: redis.Redis) -> dict[str, int]:
    return {k: v["calls"] for k, v in conn.info("commandstats").items()}


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _repeat(reps: int, once: Callable[[], dict[str, float]]) -> dict[str, float]:
    return _median([once() for _ in range(reps)])


# -- workloads -----------------------------------------------------------------------------------


def overhead(url: str, reps: int, n_trials: int) -> dict[str, Any]:
    """Each repetition runs every system once, in turn (see `scaling`)."""
    runs: dict[str, list[dict[str, float]]] = {
        "ours": [],
        "fork": [],
        "native": [],
        "raw_simple": [],
        "raw_fork": [],
    }
    workers = OurWorkers(url, 2)
    try:
        forking = OurWorkers(url, 2, isolation="fork")
        try:
            for _ in range(reps):
                runs["ours"].append(ours(url, workers, "noop", n_trials, "random"))
                runs["fork"].append(ours(url, forking, "noop", n_trials // 4, "random"))
                runs["native"].append(native(url, 2, "noop", n_trials, "random"))
                runs["raw_simple"].append(raw_rq(url, 2, "simple", n_trials))
                runs["raw_fork"].append(raw_rq(url, 2, "fork", n_trials // 4))
        finally:
            forking.stop()
    finally:
        workers.stop()
    ours_, ours_fork, anchor = _median(runs["ours"]), _median(runs["fork"]), _median(runs["native"])
    raw_simple, raw_fork = _median(runs["raw_simple"]), _median(runs["raw_fork"])
    # What the sampler alone costs per trial, in-process: the broker's CPU beyond it is ours.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler())
    cpu = time.process_time()
    for _ in range(n_trials):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", 0, 1))
    sampler_ms = (time.process_time() - cpu) * 1000 / n_trials
    return {
        "ours": ours_,
        "ours_fork": ours_fork,
        "native_2_processes": anchor,
        "raw_rq_simple": raw_simple,
        "raw_rq_fork": raw_fork,
        "sampler_cpu_ms_per_trial": sampler_ms,
        "ratio": ours_["trials_per_s"] / anchor["trials_per_s"],
        "fork_ratio_to_raw_rq_fork": ours_fork["trials_per_s"] / raw_fork["jobs_per_s"],
        "ratio_to_raw_rq_simple": ours_["trials_per_s"] / raw_simple["jobs_per_s"],
    }


def scaling(url: str, reps: int, n_trials: int, counts: list[int]) -> dict[str, Any]:
    """Each repetition runs every system once, in turn, so that a slow spell of the machine
    does not fall on one of them alone."""
    rows = []
    for count in counts:
        workers = OurWorkers(url, count)
        runs: dict[str, list[dict[str, float]]] = {
            "ours": [],
            "queued": [],
            "native": [],
            "raw": [],
        }
        try:
            for _ in range(reps):
                runs["ours"].append(ours(url, workers, "sleep_50ms", n_trials, "tpe"))
                # A cap of twice the workers keeps a trial queued behind each running one.
                runs["queued"].append(
                    ours(url, workers, "sleep_50ms", n_trials, "tpe", concurrency=2 * count)
                )
                runs["native"].append(native(url, count, "sleep_50ms", n_trials, "tpe"))
                runs["raw"].append(raw_rq(url, count, "simple", n_trials, job="raw_rq_sleep_50ms"))
        finally:
            workers.stop()
        ours_, queued = _median(runs["ours"]), _median(runs["queued"])
        anchor, raw = _median(runs["native"]), _median(runs["raw"])
        ideal = count / SLEEP_S
        rows.append(
            {
                "workers": count,
                "ours_trials_per_s": ours_["trials_per_s"],
                "ours_efficiency": ours_["trials_per_s"] / ideal,
                "ours_cap_2x_efficiency": queued["trials_per_s"] / ideal,
                "native_trials_per_s": anchor["trials_per_s"],
                "native_efficiency": anchor["trials_per_s"] / ideal,
                "raw_rq_efficiency": raw["jobs_per_s"] / ideal,
                "ratio": ours_["trials_per_s"] / anchor["trials_per_s"],
                "ours_cpu_ms_per_trial": ours_["cpu_ms_per_trial"],
                "ours_commands_per_trial": ours_["commands_per_trial"],
                "native_cpu_ms_per_trial": anchor["cpu_ms_per_trial"],
                "native_commands_per_trial": anchor["commands_per_trial"],
            }
        )
    return {"rows": rows}


def latency(url: str, n_trials: int) -> dict[str, float]:
    """One worker, a no-op objective that returns when it started (epoch seconds):

    - ask -> objective start, the worker idle: one-trial runs, so that nothing is asked ahead;
    - one objective start -> the next, with a cap of 1: the cycle a worker waits through between
      two trials (its result delivered, read, told, the next trial sent, dequeued, started).
    """
    workers = OurWorkers(url, 1)
    connection = connect(url)

    def run(n: int) -> list[optuna.trial.FrozenTrial]:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler())
        Optimizer(
            "benchmarks.objectives:started_at",
            1,
            n,
            study=study,
            connection=connection,
            prefix=workers.queue,
        ).run(x=suggest.float(0, 1))
        return sorted(study.trials, key=lambda t: t.number)

    try:
        singles = [trial for _ in range(n_trials // 2) for trial in run(1)]
        steady = run(n_trials)
    finally:
        workers.stop()
    ask_to_start = sorted(
        (t.value - t.datetime_start.timestamp()) * 1000
        for t in singles
        if t.value is not None and t.datetime_start is not None
    )
    starts = [t.value for t in steady if t.value is not None]
    cycle = sorted((b - a) * 1000 for a, b in itertools.pairwise(starts))
    return {
        "p50_ms": _percentile(ask_to_start, 0.5),
        "p99_ms": _percentile(ask_to_start, 0.99),
        "cycle_p50_ms": _percentile(cycle, 0.5),
        "cycle_p99_ms": _percentile(cycle, 0.99),
    }


def remote_trial(url: str, trials: int) -> dict[str, float]:
    """`should_prune` and `suggest_float` round trips from an objective on a worker (one worker,
    an otherwise idle broker), against the same calls on a trial in-process; milliseconds."""
    from benchmarks.objectives import round_trips

    workers = OurWorkers(url, 1)
    try:
        remote = Optimizer(
            "benchmarks.objectives:round_trips",
            1,
            trials,
            connection=connect(url),
            prefix=workers.queue,
        )
        remote.run()
    finally:
        workers.stop()
    local = optuna.create_study()
    local.optimize(round_trips, n_trials=trials)
    assert remote.study is not None  # made by the run
    figures = {}
    for where, study in (("remote", remote.study), ("in_process", local)):
        for attr in ("should_prune_ms", "suggest_ms"):
            samples = sorted(v for t in study.trials for v in t.user_attrs[attr])
            name = f"{where}_{attr[:-3]}"
            figures[f"{name}_p50_ms"] = _percentile(samples, 0.5)
            figures[f"{name}_p99_ms"] = _percentile(samples, 0.99)
    return figures


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


# -- report --------------------------------------------------------------------------------------


def write_report(results: dict[str, Any]) -> None:
    (HERE / "report.json").write_text(json.dumps(results, indent=2) + "\n")
    o, lat, flyte = results["overhead"], results["latency"], results["flyte_plugin"]
    flyte_scaling = flyte.get("scaling", {})
    lines = [
        "# Benchmarks",
        "",
        f"{results['machine']}; `{results['command']}`; medians of {results['reps']} runs.",
        "Anchor: Optuna native, N processes calling `study.optimize` on one JournalRedis study on",
        "the same redis-server. Ratios are ours / anchor (higher is better).",
        "",
        "## Scaling: 50 ms objective, TPE",
        "",
        "| workers | optuna-rq trials/s | efficiency | efficiency, cap 2x workers "
        "| native trials/s | efficiency | ratio | raw RQ efficiency "
        "| flytekitplugins-optuna efficiency | CPU ms a trial, ours / native "
        "| Redis commands a trial, ours / native |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["scaling"]["rows"]:
        plugin = flyte_scaling.get(str(row["workers"]))
        lines.append(
            f"| {row['workers']} | {row['ours_trials_per_s']:.1f} | {row['ours_efficiency']:.2f} "
            f"| {row['ours_cap_2x_efficiency']:.2f} "
            f"| {row['native_trials_per_s']:.1f} | {row['native_efficiency']:.2f} "
            f"| {row['ratio']:.2f}x | {row['raw_rq_efficiency']:.2f} "
            f"| {'n/a' if plugin is None else format(plugin['efficiency'], '.2f')} "
            f"| {_pair(row, 'cpu_ms_per_trial', '.2f')} "
            f"| {_pair(row, 'commands_per_trial', '.1f')} |"
        )
    lines += [
        "",
        "Efficiency = trials/s / (workers / 0.05 s). optuna-rq runs with the cap (`concurrency`)",
        "equal to the workers, as native runs N processes; with twice that, a trial waits queued",
        "behind each running one. Raw RQ efficiency: plain RQ SimpleWorkers running jobs that",
        "sleep 50 ms, no Optuna and no broker. flytekitplugins-optuna: its Optimizer in-process,",
        "`concurrency` = workers, an objective that holds its thread for 50 ms (as CPU-bound work",
        "does). Goal: efficiency >= 0.93 at 8 workers, and >= 1.2x native. CPU a trial: every",
        "process of the system (optuna-rq: the Optimizer's, its workers', redis-server's;",
        "native: its processes' from the start of the study, and redis-server's).",
        "",
        "![scaling](scaling.png)",
        "",
        "## Overhead: no-op objective, RandomSampler, 2 workers",
        "",
        "| | trials/s | ratio | CPU ms a trial | Redis commands a trial |",
        "|---|---|---|---|---|",
        f"| optuna-rq (`--isolation process`) | {o['ours']['trials_per_s']:.0f} "
        f"| {o['ratio']:.2f}x | {_cost(o['ours'], 'cpu_ms_per_trial', '.2f')} "
        f"| {_cost(o['ours'], 'commands_per_trial', '.1f')} |",
        f"| Optuna native, 2 processes | {o['native_2_processes']['trials_per_s']:.0f} | 1.00x "
        f"| {_cost(o['native_2_processes'], 'cpu_ms_per_trial', '.2f')} "
        f"| {_cost(o['native_2_processes'], 'commands_per_trial', '.1f')} |",
        "",
        "The queue's own cost: 2 plain RQ workers running no-op jobs (pickle, RQ's defaults).",
        "",
        "| | trials or jobs/s | ratio |",
        "|---|---|---|",
        f"| optuna-rq, `--isolation process` | {o['ours']['trials_per_s']:.0f} "
        f"| {o['ratio_to_raw_rq_simple']:.2f}x |",
        f"| raw RQ, SimpleWorker | {o['raw_rq_simple']['jobs_per_s']:.0f} | 1.00x |",
        f"| optuna-rq, `--isolation fork` | {o['ours_fork']['trials_per_s']:.0f} "
        f"| {o['fork_ratio_to_raw_rq_fork']:.2f}x |",
        f"| raw RQ, forking Worker | {o['raw_rq_fork']['jobs_per_s']:.0f} | 1.00x |",
        "",
        f"Cost per trial: {o['ours']['commands_per_trial']:.1f} Redis commands; broker CPU "
        f"{o['ours']['broker_cpu_ms_per_trial']:.2f} ms per trial, of which the sampler alone "
        f"(ask + tell in memory) is {o['sampler_cpu_ms_per_trial']:.2f} ms. This is the remote "
        "`Optimizer` on an in-memory study; goal: >= 1.5x native.",
        "",
    ]
    if "daemon_overhead" in results:  # benchmarks.daemon_storage: the daemon on its storages
        from benchmarks.daemon_storage import daemon_overhead_lines

        lines += [*daemon_overhead_lines(results["daemon_overhead"]), ""]
    if "signing" in results:  # benchmarks.daemon_storage --signing: off, a secret, keys
        from benchmarks.daemon_storage import signing_cost_lines

        lines += [*signing_cost_lines(results["signing"]), ""]
    lines += [
        "## The drop-in API, in-process: no-op objective, RandomSampler, concurrency 2",
        "",
    ]
    ours_in = results["in_process"]["trials_per_s"]
    if "skipped" in flyte:
        lines += [f"flytekitplugins-optuna not measured: {flyte['skipped']}", ""]
        lines += [f"optuna-rq in-process: {ours_in:.0f} trials/s.", ""]
    else:
        lines += [
            "| | trials/s | ratio |",
            "|---|---|---|",
            f"| flytekitplugins-optuna {flyte['version']} (Optuna {flyte['optuna']}) "
            f"| {flyte['noop_trials_per_s']:.0f} | 1.00x |",
            f"| optuna-rq | {ours_in:.0f} | {ours_in / flyte['noop_trials_per_s']:.2f}x |",
            "",
            "In-process, a trial is an ask and a tell on an in-memory study in one thread: no",
            "Redis, no other process. Neither runs objectives in parallel there (see the",
            "scaling table); optuna-rq runs the same code on workers when given a Redis.",
            "",
        ]
    lines += [
        "## Dispatch latency: one worker, a no-op objective",
        "",
        f"- Ask to objective start, the worker idle: p50 {lat['p50_ms']:.2f} ms, "
        f"p99 {lat['p99_ms']:.2f} ms.",
        f"- One objective start to the next, cap 1 (result delivered, read, told; next trial "
        f"sent, dequeued, started): p50 {lat['cycle_p50_ms']:.2f} ms, "
        f"p99 {lat['cycle_p99_ms']:.2f} ms.",
        "",
    ]
    rt = results["remote_trial"]
    lines += [
        "## Remote trial: an objective on a worker calling its trial",
        "",
        "| call | on a worker, p50 | p99 | in-process, p50 | p99 |",
        "|---|---|---|---|---|",
    ]
    for call in ("should_prune", "suggest"):
        lines.append(
            f"| `{call}{'_float' if call == 'suggest' else ''}` "
            f"| {rt[f'remote_{call}_p50_ms']:.3f} ms | {rt[f'remote_{call}_p99_ms']:.3f} ms "
            f"| {rt[f'in_process_{call}_p50_ms']:.3f} ms "
            f"| {rt[f'in_process_{call}_p99_ms']:.3f} ms |"
        )
    lines += [
        "",
        "On a worker, each call is a round trip through Redis to the broker, which runs it on the",
        "study's real trial (one worker, an otherwise idle broker).",
        "",
    ]
    if "pruning" in results:  # benchmarks.pruning_example
        from benchmarks.pruning_example import report_lines

        lines += report_lines(results["pruning"])
    if "fleet" in results:
        lines += fleet.report_lines(results["fleet"])
    (HERE / "report.md").write_text("\n".join(lines))
    _plot(results["scaling"]["rows"], flyte_scaling)


def _cost(figures: dict[str, Any], key: str, spec: str) -> str:
    """One cost of a row, blank in a report from before it was kept."""
    return format(figures[key], spec) if key in figures else ""


def _pair(row: dict[str, Any], key: str, spec: str) -> str:
    """Ours / native of one cost of a scaling row, blank where not kept."""
    if f"ours_{key}" not in row:
        return ""
    return f"{row[f'ours_{key}']:{spec}} / {row[f'native_{key}']:{spec}}"


def _plot(rows: list[dict[str, float]], flyte_scaling: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [r["workers"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("ours", "optuna-rq"), ("native", "Optuna native (JournalRedis)")):
        left.plot(counts, [r[f"{key}_trials_per_s"] for r in rows], marker="o", label=label)
        right.plot(counts, [r[f"{key}_efficiency"] for r in rows], marker="o", label=label)
    right.plot(
        counts,
        [r["raw_rq_efficiency"] for r in rows],
        marker="x",
        linestyle="--",
        color="grey",
        label="raw RQ, 50 ms jobs",
    )
    if flyte_scaling:
        right.plot(
            counts,
            [flyte_scaling[str(c)]["efficiency"] for c in counts],
            marker="s",
            label="flytekitplugins-optuna in-process",
        )
    left.plot(counts, [c / SLEEP_S for c in counts], linestyle=":", color="grey", label="ideal")
    left.set(xlabel="workers", ylabel="trials/s", title="Throughput, 50 ms objective")
    right.set(xlabel="workers", ylabel="efficiency", title="Efficiency", ylim=(0, 1.05))
    for axis in (left, right):
        axis.set_xticks(counts)
        axis.legend()
    fig.tight_layout()
    fig.savefig(HERE / "scaling.png", dpi=100)


def _daemon_overhead(url: str, reps: int, n_trials: int) -> dict[str, Any]:
    """The daemon's no-op overhead on its default journal file and in memory (imported here:
    benchmarks.daemon_storage imports this module)."""
    from benchmarks.daemon_storage import daemon_overhead

    return daemon_overhead(url, reps, n_trials)


def _signing_cost(url: str, reps: int, n_trials: int) -> dict[str, Any]:
    """The cost of signing on the daemon's default journal (imported here, as above)."""
    from benchmarks.daemon_storage import signing_cost

    return signing_cost(url, reps, n_trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--only",
        choices=SECTIONS,
        help="run this section alone; the others' figures are kept from report.json",
    )
    args = parser.parse_args()
    if args.only is not None:
        _run_section(args.only, args.quick)
        return
    reps = 1 if args.quick else args.reps
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with embedded_redis("bench") as url:
        results: dict[str, Any] = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, optuna {optuna.__version__}",
            "command": "python -m benchmarks.run" + (" --quick" if args.quick else ""),
            "reps": reps,
            "overhead": overhead(url, reps, 200 if args.quick else 1000),
            "scaling": scaling(
                url, reps, 40 if args.quick else 400, [1, 2] if args.quick else [1, 2, 4, 8]
            ),
            "latency": latency(url, 20 if args.quick else 200),
            "in_process": in_process(reps, 200 if args.quick else 1000),
            "remote_trial": remote_trial(url, 1 if args.quick else 3),
            "fleet": fleet.section(url, quick=args.quick),
        }
        results["daemon_overhead"] = _daemon_overhead(url, reps, 100 if args.quick else 400)
        results["signing"] = _signing_section(url, quick=args.quick)
        results["pruning"] = _pruning_section(url, quick=args.quick)
    counts = [row["workers"] for row in results["scaling"]["rows"]]
    results["flyte_plugin"] = flyte_plugin(reps, 200 if args.quick else 1000, counts)
    write_report(results)
    print((HERE / "report.md").read_text())


def _daemon_overhead_section(url: str, *, quick: bool) -> dict[str, Any]:
    return _daemon_overhead(url, 1 if quick else 3, 100 if quick else 400)


def _signing_section(url: str, *, quick: bool) -> dict[str, Any]:
    # More trials and repetitions than the other sections: signing's cost per trial is a few
    # percent of the broker's CPU, well under what one run on a busy machine varies by.
    return _signing_cost(url, 1 if quick else 5, 100 if quick else 1000)


def _pruning_section(url: str, *, quick: bool) -> dict[str, Any]:
    from benchmarks.pruning_example import section

    return section(url, quick=quick)


SECTIONS = {
    "fleet": fleet.section,
    "pruning": _pruning_section,
    "daemon_overhead": _daemon_overhead_section,
    "signing": _signing_section,
}
"""The sections `--only` runs alone: each takes the Redis URL and `quick`."""


def _run_section(name: str, quick: bool) -> None:
    """Run section `name` alone and put its figures into the last full run's report."""
    previous = HERE / "report.json"
    results: dict[str, Any] = json.loads(previous.read_text()) if previous.exists() else {}
    if "overhead" not in results:
        sys.exit(f"{previous} holds no full run: run `python -m benchmarks.run` once first")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with embedded_redis("bench") as url:
        results[name] = SECTIONS[name](url, quick=quick)
    write_report(results)
    print((HERE / "report.md").read_text())


if __name__ == "__main__":
    main()
