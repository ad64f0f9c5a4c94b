"""The broker at fleet scale: one real broker driven by hundreds to a thousand simulated workers.

Each run starts `optuna-rq broker` on a prefix of its own (its default durable storage: the
journal file under its state directory), a `SimulatedFleet` (benchmarks/fleet_simulator.py) of
`workers` simulated workers, and submits one study through `BrokerClient` with the cap equal to
the workers. Every message is signed (a secret shared by the broker, the fleet and the client).

Figures, per run:

- trials/s: n_trials over first ask to last tell (the trials' own timestamps in the storage);
  efficiency against the ideal, workers / trial duration; and the client's wall time, submit
  to the status saying the study ended;
- dispatch latency: a trial's ask (its `datetime_start`) to its simulated start (the wall-clock
  second the simulated worker took its lease, which it reports as the trial's value);
- broker CPU per trial (psutil, user + system, submit to end, the broker's process and its
  sampler process) and their resident memory (peak, sampled while it runs), beside the sampler
  alone: ask + suggest + tell on an in-memory study,
  the same sampler, the same number of trials, in this process;
- with `probe`, remote-trial calls under that load: one real worker (`optuna-rq workers --queue
  probe`) runs `benchmarks.objectives:short_round_trips` (20 `should_prune`, 5 `suggest_float`,
  each timed on the worker) in a study of its own on the same broker, from half-way through the
  fleet's study to its end, then again on the broker left idle: p50 and p99 of each, loaded and
  idle, in one run.

    uv run --frozen python -m benchmarks.fleet --sampler random --workers 1000 --n-trials 10000 \
        [--profile broker.prof] [--probe]

runs one configuration (with `--profile`, the broker under cProfile); `python -m benchmarks.run`
runs the section (`--only fleet` for it alone).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pstats
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import psutil

from benchmarks.fleet_simulator import FleetSettings, SimulatedFleet
from benchmarks.redis_server import embedded_redis
from optuna_rq.client import BrokerClient
from optuna_rq.plumbing.connection import connect
from optuna_rq.protocol import ENV_SECRET, Keys, Sampler, Signer, StudySpec, live_pools, workers_on
from optuna_rq.storage.storage_access import default_storage_url
from optuna_rq.study.algorithms import make_sampler

__all__ = ["FleetRun", "report_lines", "run_fleet", "section"]

ROOT = Path(__file__).resolve().parent.parent
MODULE = "benchmarks.objectives"
OBJECTIVE = f"{MODULE}:noop"  # checked against the allow-list, never called
SPACE = {"x": {"type": "float", "low": 0.0, "high": 1.0}}
WORKERS_PER_PROCESS = 250
PROBE_QUEUE = "probe"  # its own resource class: no simulated worker takes the probe's trials
PROBE_OBJECTIVE = f"{MODULE}:short_round_trips"
PROBE_IDLE_TRIALS = 20


@dataclass(frozen=True)
class FleetRun:
    """One configuration of the section."""

    sampler: str
    workers: int
    n_trials: int
    trial_s: float
    probe: bool = False  # remote-trial calls timed under this load, and idle
    on_loop: bool = False  # the broker started with --sample-on-loop: no sampler process
    sampler_processes: int = 1  # the broker's --sampler-processes

    @property
    def ideal_trials_per_s(self) -> float:
        return self.workers / self.trial_s


FULL = [
    FleetRun("random", 100, 2000, 1.0),
    FleetRun("random", 1000, 10_000, 1.0),
    # TPE's ask grows with the history (about 8 us per past trial here: the sampler alone costs
    # 8 ms a trial over 2,000 trials, 11 ms over 3,000): 2,000 and 3,000 trials keep each run,
    # and the sampler measured alone beside it, within about three minutes.
    FleetRun("tpe", 100, 2000, 1.0),
    FleetRun("tpe", 1000, 3000, 1.0),
    # ... and sampled in two processes (`--sampler-processes 2`): the one before is its anchor.
    FleetRun("tpe", 1000, 3000, 1.0, sampler_processes=2),
    # The same TPE study again, with remote-trial calls timed through its second half (a row of
    # its own: the probe's calls cost the broker CPU the rows above do not spend).
    FleetRun("tpe", 100, 2000, 1.0, probe=True),
    # ... and with every study sampled on the broker's loop (`--sample-on-loop`): the anchor of
    # the sampler process, side by side.
    FleetRun("tpe", 100, 2000, 1.0, probe=True, on_loop=True),
]
QUICK = [
    FleetRun("random", 100, 400, 0.5),
    FleetRun("random", 1000, 2000, 1.0),
    FleetRun("tpe", 100, 300, 0.5, probe=True),
]


class Broker:
    """`optuna-rq broker` on `prefix`, its state (and journal) in a directory of its own;
    under cProfile, writing to `profile`, if given."""

    def __init__(
        self,
        url: str,
        prefix: str,
        secret: str,
        *,
        profile: Path | None = None,
        state_root: Path | None = None,
        on_loop: bool = False,
        sampler_processes: int = 1,
    ) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="orq-fleet-", dir=state_root or "/tmp"))
        self.storage_url = default_storage_url(self.state)
        runner = ["-m", "cProfile", "-o", str(profile)] if profile else []
        argv = [sys.executable, *runner, "-m", "optuna_rq.cli.app", "--redis-url", url]
        argv += ["--prefix", prefix, "broker", "--log-level", "WARNING"]
        argv += ["--sample-on-loop"] if on_loop else []
        argv += ["--sampler-processes", str(sampler_processes)]
        env = dict(os.environ, OPTUNA_RQ_STATE_DIR=str(self.state), PYTHONPATH=str(ROOT))
        env[ENV_SECRET] = secret
        self.process = subprocess.Popen(argv, env=env)
        self.ps = psutil.Process(self.process.pid)
        connection = connect(url)
        deadline = time.monotonic() + 60
        while not connection.exists(Keys(prefix).broker):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                shutil.rmtree(self.state, ignore_errors=True)
                raise RuntimeError(f"the broker did not start (exit {self.process.returncode})")
            time.sleep(0.05)

    def _processes(self) -> list[psutil.Process]:
        """The broker and its sampler process, once it has one."""
        return [self.ps, *self.ps.children(recursive=True)]

    def loop_and_samplers_cpu_s(self) -> tuple[float, float]:
        """User + system CPU of the broker's own process (its loop) and of its children (the
        sampler processes)."""
        own, *children = [p.cpu_times() for p in self._processes()]
        return own.user + own.system, sum(t.user + t.system for t in children)

    def rss_mb(self) -> float:
        return sum(float(p.memory_info().rss) for p in self._processes()) / 2**20

    def stop(self) -> None:
        _terminate(self.process, timeout_s=120)


def run_fleet(
    url: str,
    run: FleetRun,
    *,
    processes: int | None = None,
    profile: Path | None = None,
    state_root: Path | None = None,
    timeout_s: float = 1800.0,
) -> dict[str, Any]:
    """Run one study of `run` on a fresh broker and fleet; its figures. `state_root`: where the
    broker's state directory (and so its journal) is made, /tmp by default (a disk here; pass
    /dev/shm to see the broker without the journal's fsyncs)."""
    prefix = f"fleet-{time.monotonic_ns()}"
    secret = secrets.token_hex(32)
    signer = Signer(secret.encode())
    processes = processes or max(1, min(4, run.workers // WORKERS_PER_PROCESS))
    connection = connect(url)
    keys = Keys(prefix)
    broker = Broker(
        url,
        prefix,
        secret,
        profile=profile,
        state_root=state_root,
        on_loop=run.on_loop,
        sampler_processes=run.sampler_processes,
    )
    probe = ProbeWorker(url, prefix, secret) if run.probe else None
    probing = False
    try:
        settings = FleetSettings(
            redis_url=url,
            prefix=prefix,
            module=MODULE,
            workers=run.workers,
            processes=processes,
            trial_s=run.trial_s,
            secret=secret.encode(),
        )
        with SimulatedFleet(settings) as fleet:
            live = sum(p.workers for p in live_pools(connection, keys, signer))
            client = BrokerClient(connection, prefix, signer=signer)
            spec = StudySpec(
                name=f"fleet-{run.sampler}-{run.workers}",
                objective=OBJECTIVE,
                space=SPACE,
                n_trials=run.n_trials,
                concurrency=run.workers,
                sampler=Sampler(run.sampler),
            )
            rss_start, fleet_cpu = broker.rss_mb(), _cpu_s(fleet.pids)
            split = broker.loop_and_samplers_cpu_s()
            cpu, started = sum(split), time.perf_counter()
            client.submit(spec)
            rss_peak, seen_live = rss_start, False
            deadline = time.monotonic() + timeout_s
            while True:
                status = client.status(spec.name)
                if status is not None and status.state.ended:
                    break
                if status is not None and status.running and not status.waiting_for_workers:
                    seen_live = True
                if probe and not probing and status and status.complete >= run.n_trials // 2:
                    client.submit(probe.spec(PROBE_LOADED, 10**6))
                    probing = True
                if time.monotonic() > deadline:
                    raise RuntimeError(f"study {spec.name} did not end in {timeout_s:g}s")
                rss_peak = max(rss_peak, broker.rss_mb())
                time.sleep(0.05)
            wall = time.perf_counter() - started
            loop_cpu, samplers_cpu = (
                end - start
                for end, start in zip(broker.loop_and_samplers_cpu_s(), split, strict=True)
            )
            cpu = loop_cpu + samplers_cpu
            load = os.getloadavg()[0]  # others' processes share these cores: say how busy
            fleet_cpu = _cpu_s(fleet.pids) - fleet_cpu
            rss_peak = max(rss_peak, broker.rss_mb())
            if probe is not None:
                probe.idle(client)
        broker.stop()  # its journal is flushed and closed before it is read
        storage = _read_only(broker.storage_url)
        trials = optuna.load_study(study_name=spec.name, storage=storage).get_trials()
        probed = probe.figures(storage, until=max(_tells(trials))) if probe else None
    finally:
        if probe is not None:
            probe.stop()
        broker.stop()
        shutil.rmtree(broker.state, ignore_errors=True)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    asks = [t.datetime_start.timestamp() for t in trials if t.datetime_start]
    tells = _tells(trials)
    dispatch = sorted(
        (t.value - t.datetime_start.timestamp()) * 1000
        for t in complete
        if t.value is not None and t.datetime_start is not None
    )
    span = max(tells) - min(asks)
    trials_per_s = len(complete) / span
    return {
        **run.__dict__,
        "processes": processes,
        "live_workers": live,
        "counted_live": seen_live,
        "complete": len(complete),
        "trials": len(trials),
        "trials_per_s": trials_per_s,
        "efficiency": trials_per_s / run.ideal_trials_per_s,
        "wall_s": wall,
        "wall_efficiency": run.n_trials * run.trial_s / run.workers / wall,
        "dispatch_p50_ms": _percentile(dispatch, 0.5),
        "dispatch_p99_ms": _percentile(dispatch, 0.99),
        "broker_cpu_ms_per_trial": cpu * 1000 / run.n_trials,
        "loop_cpu_ms_per_trial": loop_cpu * 1000 / run.n_trials,
        "samplers_cpu_ms_per_trial": samplers_cpu * 1000 / run.n_trials,
        "broker_cpu_share": cpu / wall,
        "fleet_cpu_ms_per_trial": fleet_cpu * 1000 / run.n_trials,
        "broker_rss_start_mb": rss_start,
        "broker_rss_peak_mb": rss_peak,
        "load_1m": load,
        **({"remote_trial_calls": probed} if probed else {}),
    }


def _tells(trials: list[optuna.trial.FrozenTrial]) -> list[float]:
    return [t.datetime_complete.timestamp() for t in trials if t.datetime_complete]


PROBE_LOADED, PROBE_IDLE = "probe-loaded", "probe-idle"


class ProbeWorker:
    """One real worker on the fleet's prefix, serving only the probe's resource class, and the
    probe studies it runs: `short_round_trips`, which times its remote-trial calls on the
    worker."""

    def __init__(self, url: str, prefix: str, secret: str) -> None:
        argv = [sys.executable, "-m", "optuna_rq.cli.app", "--redis-url", url, "--prefix", prefix]
        argv += ["workers", "--count", "1", "--queue", PROBE_QUEUE, "--import", MODULE]
        argv += ["--log-level", "WARNING"]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        env[ENV_SECRET] = secret
        self.process = subprocess.Popen(argv, env=env)
        connection, keys, signer = connect(url), Keys(prefix), Signer(secret.encode())
        queue = keys.trial_queue(MODULE, PROBE_QUEUE)
        deadline = time.monotonic() + 60
        while not workers_on(live_pools(connection, keys, signer), queue):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the probe worker did not start ({self.process.returncode})")
            time.sleep(0.05)

    @staticmethod
    def spec(name: str, n_trials: int) -> StudySpec:
        return StudySpec(
            name=name,
            objective=PROBE_OBJECTIVE,
            space={},
            n_trials=n_trials,
            concurrency=1,
            sampler=Sampler.RANDOM,
            queue=PROBE_QUEUE,
        )

    def idle(self, client: BrokerClient) -> None:
        """Stop the loaded probe (the fleet's study has ended), then probe the idle broker."""
        client.cancel(PROBE_LOADED)
        client.submit(self.spec(PROBE_IDLE, PROBE_IDLE_TRIALS))
        deadline = time.monotonic() + 120
        while not ((status := client.status(PROBE_IDLE)) and status.state.ended):
            if time.monotonic() > deadline:
                raise RuntimeError("the idle probe did not end in 120 s")
            time.sleep(0.05)

    @staticmethod
    def figures(storage: optuna.storages.BaseStorage, *, until: float) -> dict[str, Any]:
        """p50/p99 of each call, loaded (trials that ended before the fleet's last tell) and
        idle; milliseconds."""
        out: dict[str, Any] = {}
        for where, name in (("loaded", PROBE_LOADED), ("idle", PROBE_IDLE)):
            done = [
                t
                for t in optuna.load_study(study_name=name, storage=storage).get_trials()
                if t.state == optuna.trial.TrialState.COMPLETE
                and t.datetime_complete is not None
                and (where == "idle" or t.datetime_complete.timestamp() <= until)
            ]
            out[f"{where}_trials"] = len(done)
            for attr in ("should_prune_ms", "suggest_ms"):
                samples = sorted(v for t in done for v in t.user_attrs[attr])
                call = attr.removesuffix("_ms")
                out[f"{where}_{call}_p50_ms"] = _percentile(samples, 0.5)
                out[f"{where}_{call}_p99_ms"] = _percentile(samples, 0.99)
        return out

    def stop(self) -> None:
        _terminate(self.process, timeout_s=60)


def sampler_cpu_ms(sampler: str, n_trials: int) -> float:
    """CPU per trial of the sampler alone: ask, suggest and tell on an in-memory study, in this
    process, as the broker's sampler would do them (its `make_sampler`)."""
    study = optuna.create_study(sampler=make_sampler(Sampler(sampler), None))
    cpu = time.process_time()
    for _ in range(n_trials):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", 0.0, 1.0))
    return (time.process_time() - cpu) * 1000 / n_trials


def section(url: str, *, quick: bool = False) -> dict[str, Any]:
    """Every configuration of the section (`QUICK` or `FULL`), with the sampler alone beside
    each."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    runs = QUICK if quick else FULL
    alone: dict[tuple[str, int], float] = {}
    rows = []
    for run in runs:
        row = run_fleet(url, run)
        key = (run.sampler, run.n_trials)
        if key not in alone:
            alone[key] = sampler_cpu_ms(*key)
        row["sampler_cpu_ms_per_trial"] = alone[key]
        row["broker_cpu_ms_beyond_sampler"] = row["broker_cpu_ms_per_trial"] - alone[key]
        rows.append(row)
    return {
        "command": "python -m benchmarks.run --only fleet" + (" --quick" if quick else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": rows,
    }


def report_lines(fleet: dict[str, Any]) -> list[str]:
    """benchmarks/report.md's section for `section`'s figures."""
    lines = [
        "## Fleet: one broker, simulated workers",
        "",
        f"`{fleet['command']}`, {fleet['date']}; one run per row. Simulated workers "
        "(benchmarks/fleet_simulator.py) speak the real protocol: the RQ job, the signed "
        "request, the lease, the pool heartbeat, the result. One `optuna-rq broker` per row on "
        "its default storage (the journal file), cap = workers, messages signed.",
        "",
        "| sampler | sampling | workers | trials | trial | trials/s | efficiency | wall efficiency "
        "| dispatch p50 | p99 | broker CPU/trial | sampler alone | beyond the sampler "
        "| broker RSS peak | fleet CPU/trial | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in fleet["rows"]:
        lines.append(
            f"| {r['sampler']} | {_sampling(r)} | {r['workers']} | {r['n_trials']} "
            f"| {r['trial_s']:g} s "
            f"| {r['trials_per_s']:.0f} | {r['efficiency']:.2f} | {r['wall_efficiency']:.2f} "
            f"| {r['dispatch_p50_ms']:.1f} ms | {r['dispatch_p99_ms']:.1f} ms "
            f"| {r['broker_cpu_ms_per_trial']:.2f} ms | {r['sampler_cpu_ms_per_trial']:.2f} ms "
            f"| {r['broker_cpu_ms_beyond_sampler']:.2f} ms | {r['broker_rss_peak_mb']:.0f} MB "
            f"| {r['fleet_cpu_ms_per_trial']:.2f} ms | {_load(r)} |"
        )
    lines += [
        "",
        "Efficiency = trials/s (first ask to last tell) / (workers / trial duration); wall "
        "efficiency counts from submit to the status saying the study ended. Dispatch: a "
        "trial's ask to its simulated start. Broker CPU: user + system of the broker process "
        "and its sampler processes (a study whose sampler is slow samples there, unless the "
        "broker runs with `--sample-on-loop`; one, unless the row says more), "
        "submit to end, per trial; the sampler alone "
        "is ask + suggest + tell on an in-memory "
        "study with the same sampler and number of trials. Goal (10,000 one-second trials over "
        "1,000 workers, RandomSampler): efficiency >= 0.87 and <= 1 ms of broker CPU per trial "
        "beyond the sampler. Fleet CPU: the simulated workers' own, on the same 2 cores; load: "
        "the machine's 1-minute load average as the run ended (other processes share it).",
        "",
    ]
    lines += _projection_lines(fleet["rows"])
    probed = [r for r in fleet["rows"] if "remote_trial_calls" in r]
    if probed:
        lines += _probe_lines(probed)
    return lines


PROJECTED_CORES = 16


def _projection_lines(rows: list[dict[str, Any]]) -> list[str]:
    """What the rows sampled in more than one process project for `PROJECTED_CORES` cores,
    from their CPU a trial: the loop is one process (one core at most), and each sampler
    process another; the fleet and Redis are left to other machines."""
    lines = []
    for r in rows:
        if r.get("sampler_processes", 1) < 2 or not r.get("samplers_cpu_ms_per_trial"):
            continue
        loop_cap = 1000 / r["loop_cpu_ms_per_trial"]
        process_cap = 1000 / r["samplers_cpu_ms_per_trial"]
        processes = min(PROJECTED_CORES - 1, math.ceil(loop_cap / process_cap))
        projected = min(loop_cap, processes * process_cap, r["workers"] / r["trial_s"])
        lines += [
            f"Projection for {PROJECTED_CORES} cores ({r['sampler']}, {r['workers']} workers, "
            f"{r['n_trials']} trials): the loop spends {r['loop_cpu_ms_per_trial']:.2f} ms of CPU "
            f"a trial (at most {loop_cap:.0f} trials/s on its core) and sampling "
            f"{r['samplers_cpu_ms_per_trial']:.2f} ms ({process_cap:.0f} trials/s a process): "
            f"{processes} sampler processes reach {projected:.0f} trials/s (efficiency "
            f"{projected * r['trial_s'] / r['workers']:.2f}), and the loop's own CPU is what "
            "stops more. A sampler's ask grows with the study's history (TPE's), so a longer "
            "study needs more processes for the same rate.",
            "",
        ]
    return lines


def _sampling(row: dict[str, Any]) -> str:
    if row.get("on_loop"):
        return "on the loop (`--sample-on-loop`)"
    processes = row.get("sampler_processes", 1)
    return "sampler process" if processes == 1 else f"{processes} sampler processes"


def _probe_lines(rows: list[dict[str, Any]]) -> list[str]:
    first = rows[0]
    lines = [
        f"Remote-trial calls while the broker runs a {first['sampler'].upper()} study of "
        f"{first['n_trials']:,} trials over {first['workers']} simulated workers (the rows "
        "above with the same figures, the broker's default, its slow sampler in the sampler "
        "process, and `--sample-on-loop`): one real worker, a resource class of its own, runs "
        "an objective that times 20 `should_prune` and 5 `suggest_float` calls per trial, "
        "from half-way through the study to its end, then on the same broker left idle. "
        "Goal: p99 under load within a few milliseconds of idle.",
        "",
        "| sampling | call | loaded p50 | loaded p99 | idle p50 | idle p99 |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        probe = row["remote_trial_calls"]
        for call, shown in (("should_prune", "`should_prune`"), ("suggest", "`suggest_float`")):
            lines.append(
                f"| {_sampling(row)} | {shown} | {probe[f'loaded_{call}_p50_ms']:.2f} ms "
                f"| {probe[f'loaded_{call}_p99_ms']:.2f} ms "
                f"| {probe[f'idle_{call}_p50_ms']:.2f} ms "
                f"| {probe[f'idle_{call}_p99_ms']:.2f} ms |"
            )
    return [*lines, ""]


def _load(row: dict[str, Any]) -> str:
    return "n/a" if row.get("load_1m") is None else f"{row['load_1m']:.1f}"


def _read_only(url: str) -> optuna.storages.BaseStorage:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(url.removeprefix("journal://")))


def _terminate(process: subprocess.Popen[bytes], *, timeout_s: float) -> None:
    """SIGTERM, then wait; killed if it is still there after `timeout_s`."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def main() -> None:

    parser = argparse.ArgumentParser(description="One fleet configuration (see the docstring).")
    parser.add_argument("--sampler", default="random")
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--n-trials", type=int, default=10_000)
    parser.add_argument("--trial-s", type=float, default=1.0)
    parser.add_argument("--processes", type=int, default=None)
    parser.add_argument("--profile", type=Path, default=None, help="cProfile the broker here")
    parser.add_argument("--state-root", type=Path, default=None, help="the broker's state here")
    parser.add_argument("--probe", action="store_true", help="time remote-trial calls too")
    parser.add_argument(
        "--sample-on-loop", action="store_true", help="the broker has no sampler process"
    )
    parser.add_argument(
        "--sampler-processes", type=int, default=1, help="the broker's most sampler processes"
    )
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with embedded_redis("fleet-redis") as url:
        run = FleetRun(
            args.sampler,
            args.workers,
            args.n_trials,
            args.trial_s,
            args.probe,
            args.sample_on_loop,
            args.sampler_processes,
        )
        row = run_fleet(
            url, run, processes=args.processes, profile=args.profile, state_root=args.state_root
        )
    row["sampler_cpu_ms_per_trial"] = sampler_cpu_ms(args.sampler, args.n_trials)
    row["broker_cpu_ms_beyond_sampler"] = (
        row["broker_cpu_ms_per_trial"] - row["sampler_cpu_ms_per_trial"]
    )
    print(json.dumps(row, indent=2))
    if args.profile is not None:
        stats = pstats.Stats(str(args.profile))
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
