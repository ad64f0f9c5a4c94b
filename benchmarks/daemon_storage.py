"""The broker daemon's own storage cost: a no-op study through `optuna-rq broker`, on its default
durable storage (the journal file under its state directory) and on `--storage memory`, next to
Optuna native (2 processes on JournalRedis), in one run, as ratios to the anchor.

    uv run python -m benchmarks.daemon_storage [--trials 400] [--reps 1]
        [--breakdown [--batch N] | --signing]

With `--breakdown`, one study on the default storage is also taken apart: CPU per trial of the
broker, the workers and redis-server (psutil), and Redis commands per trial by command (INFO
commandstats): where a no-op trial's cost goes. With `--by-process` too, the same study again
on a redis-server of its own under MONITOR, each command counted by the process that sent it
(`benchmarks.command_sources`).

With `--signing`, instead: the cost of signing. The same study on the default storage with
signing off, with one shared secret and with a key per role (repetitions interleaved): trials/s,
and CPU ms per trial of the broker and of the workers, as ratios to signing off; and the
microseconds to seal and to open one message in each mode. `benchmarks.run --only signing` puts
it into the report.

`benchmarks.run` calls `daemon_overhead` and renders `daemon_overhead_lines` into its report.
Each repetition runs every system once, in turn; figures are medians. The timed span is the
study's: from the submission until its status says finished (polled every 5 ms), with the broker
and its 2 workers already running.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import psutil

from benchmarks.redis_server import embedded_redis
from benchmarks.run import ROOT, OurWorkers, _command_calls, _median, native
from optuna_rq import suggest
from optuna_rq.client import BrokerClient
from optuna_rq.plumbing.connection import connect
from optuna_rq.protocol import (
    ENV_KEY,
    ENV_KEY_FILE,
    ENV_SECRET,
    ENV_SECRET_FILE,
    Record,
    Role,
    Sampler,
    Signer,
    StudySpec,
    StudyState,
    generate_keyrings,
)
from optuna_rq.space.space_files import space_to_data

__all__ = [
    "daemon_overhead",
    "daemon_overhead_lines",
    "seal_open_us",
    "signing_cost",
    "signing_cost_lines",
]

STORAGES = {"journal": None, "memory": "memory"}
"""The daemon's storages measured: its default (no --storage: the journal file), and memory."""
CONCURRENCY = 8
"""The cap of the daemon's studies (the issue's configuration: cap 8 on 2 workers)."""
BATCH = 4
"""The default storage again with `--batch 4`: a worker's job carries 4 trials."""
ASK_AHEAD = 1
"""The default storage again with `--ask-ahead 1`: what sampling before a slot frees buys (the
sampler then sees a trial more than the cap running)."""


class _Broker:
    """`optuna-rq broker` on the workers' prefix, with a state directory of its own."""

    def __init__(
        self,
        url: str,
        prefix: str,
        storage: str | None,
        *,
        env: dict[str, str] | None = None,
        client_signer: Signer | None = None,
    ) -> None:
        self.state = Path(tempfile.mkdtemp(prefix="orq-bench-daemon-", dir="/tmp"))
        command = [
            sys.executable,
            "-m",
            "optuna_rq.cli.app",
            "--redis-url",
            url,
            "--prefix",
            prefix,
        ]
        command += ["broker", "--log-level", "WARNING"]
        command += [] if storage is None else ["--storage", storage]
        self.process = subprocess.Popen(
            command,
            env=dict(
                os.environ, PYTHONPATH=str(ROOT), OPTUNA_RQ_STATE_DIR=str(self.state), **(env or {})
            ),
        )
        self.client = BrokerClient(connect(url), prefix, signer=client_signer)
        while self.client.broker_holder() is None:
            if self.process.poll() is not None:
                raise RuntimeError(f"the broker exited with {self.process.returncode}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        shutil.rmtree(self.state, ignore_errors=True)


def _daemon_study(
    broker: _Broker, n_trials: int, *, ask_ahead: int = 0, batch: int = 1
) -> dict[str, float]:
    """Trials per second of one no-op study of `n_trials` on 2 workers, cap 8 (fair share
    keeps a worker's worth outstanding: one trial each, or one batch)."""
    spec = StudySpec(
        name=f"daemon-{time.monotonic_ns()}",
        objective="benchmarks.objectives:noop",
        space=space_to_data({"x": suggest.float(0, 1)}),
        n_trials=n_trials,
        concurrency=CONCURRENCY,
        sampler=Sampler.RANDOM,
        ask_ahead=ask_ahead,
        batch=batch,
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
    """The daemon on each of `STORAGES` and Optuna native with 2 processes on JournalRedis; each
    with its CPU a trial (every process of it, redis-server included) and Redis commands a
    trial (the status polls of the timing included: one a trial or so)."""
    conn = connect(url)
    redis_server = psutil.Process(int(conn.info("server")["process_id"]))
    systems = {name: (storage, 0, 1) for name, storage in STORAGES.items()}
    systems["journal_ask_ahead"] = (None, ASK_AHEAD, 1)
    systems["journal_batch"] = (None, 0, BATCH)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in [*systems, "native"]}
    for _ in range(reps):
        for name, (storage, ask_ahead, batch) in systems.items():
            workers = OurWorkers(url, 2)
            try:
                broker = _Broker(url, workers.queue, storage)
                try:
                    pool = psutil.Process(workers.process.pid)
                    ours = [psutil.Process(broker.process.pid), pool, *pool.children(True)]
                    study = _costed(
                        conn,
                        [*ours, redis_server],
                        n_trials,
                        functools.partial(
                            _daemon_study, broker, n_trials, ask_ahead=ask_ahead, batch=batch
                        ),
                    )
                    runs[name].append(study)
                finally:
                    broker.stop()
            finally:
                workers.stop()
        runs["native"].append(
            _costed(
                conn,
                [redis_server],
                n_trials,
                lambda: native(url, 2, "noop", n_trials, "random"),
            )
        )
    medians = {name: _median(rows) for name, rows in runs.items()}
    anchor = medians["native"]["trials_per_s"]
    return {
        "n_trials": n_trials,
        **{f"daemon_{name}": medians[name] for name in systems},
        "native_2_processes": medians["native"],
        **{f"daemon_{name}_ratio": medians[name]["trials_per_s"] / anchor for name in systems},
    }


def _costed(
    conn: Any,
    processes: list[psutil.Process],
    n_trials: int,
    study: Callable[[], dict[str, float]],
) -> dict[str, float]:
    """`study()`'s figures, with the CPU ms a trial of `processes` (and the `cpu_s` `study()`
    reports of processes that timed themselves: native's) and Redis commands a trial."""
    cpu = _cpu_s(processes)
    calls = _command_calls(conn)
    figures = dict(study())
    spent = _cpu_s(processes) - cpu + figures.pop("cpu_s", 0.0)
    after = _command_calls(conn)
    figures["cpu_ms_per_trial"] = spent * 1000 / n_trials
    figures["commands_per_trial"] = (sum(after.values()) - sum(calls.values())) / n_trials
    return figures


def _cost_cells(figures: dict[str, float]) -> str:
    """The CPU and commands a trial of one row (blank for a report from before they were kept)."""
    if "cpu_ms_per_trial" not in figures:
        return "| | "
    return f"| {figures['cpu_ms_per_trial']:.2f} | {figures['commands_per_trial']:.1f}"


def daemon_overhead_lines(d: dict[str, Any]) -> list[str]:
    """The report's section for `daemon_overhead`'s results."""
    return [
        f"## Overhead, the broker daemon: no-op objective, RandomSampler, 2 workers, cap "
        f"{CONCURRENCY}, {d['n_trials']} trials",
        "",
        "| | trials/s | ratio | CPU ms a trial | Redis commands a trial |",
        "|---|---|---|---|---|",
        f"| `optuna-rq broker`, default storage (journal file) "
        f"| {d['daemon_journal']['trials_per_s']:.0f} | {d['daemon_journal_ratio']:.2f}x "
        f"{_cost_cells(d['daemon_journal'])} |",
        f"| `optuna-rq broker --storage memory` "
        f"| {d['daemon_memory']['trials_per_s']:.0f} | {d['daemon_memory_ratio']:.2f}x "
        f"{_cost_cells(d['daemon_memory'])} |",
        *(
            [
                f"| default storage, `submit --ask-ahead {ASK_AHEAD}` "
                f"| {d['daemon_journal_ask_ahead']['trials_per_s']:.0f} "
                f"| {d['daemon_journal_ask_ahead_ratio']:.2f}x "
                f"{_cost_cells(d['daemon_journal_ask_ahead'])} |"
            ]
            if "daemon_journal_ask_ahead" in d
            else []
        ),
        *(
            [
                f"| default storage, `submit --batch {BATCH}` "
                f"| {d['daemon_journal_batch']['trials_per_s']:.0f} "
                f"| {d['daemon_journal_batch_ratio']:.2f}x "
                f"{_cost_cells(d['daemon_journal_batch'])} |"
            ]
            if "daemon_journal_batch" in d
            else []
        ),
        f"| Optuna native, 2 processes (JournalRedis) "
        f"| {d['native_2_processes']['trials_per_s']:.0f} | 1.00x "
        f"{_cost_cells(d['native_2_processes'])} |",
        "",
        "CPU a trial: every process of the system, redis-server included; Redis commands a trial",
        "include the timing's own status polls (about one a trial). Goal (issue 29): at most 20",
        "commands a trial on the default path, and its CPU halved.",
        "Timed from the submission until the study's status says finished (polled every 5 ms),",
        "with the broker and its workers already running. Goal: >= 1.5x native, on each storage.",
        f"With `--ask-ahead {ASK_AHEAD}` the broker samples the next trial while the workers run",
        "(the sampler then sees one trial more than the cap running); by default it asks when a",
        "slot frees, so a seeded sampler at cap 1 gives `study.optimize`'s params.",
        f"With `--batch {BATCH}` a worker takes {BATCH} trials in one RQ job (each still leased",
        "and reported on its own); fair share then keeps that many outstanding per worker.",
    ]


def breakdown(url: str, n_trials: int, batch: int = 1) -> dict[str, Any]:
    """One study on the daemon's default storage, 2 workers: CPU ms per trial of each process
    kind, and Redis commands per trial (all, and the most called)."""
    conn = connect(url)
    redis_server = psutil.Process(int(conn.info("server")["process_id"]))
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
            figures = _daemon_study(broker, n_trials, batch=batch)
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


SIGNING_MODES = {
    "off": "off",
    "secret": "one shared secret (HMAC-SHA256)",
    "keys": "a key per role (Ed25519)",
}
"""`--signing`: the same study with signing off, with one shared secret and with a key per role."""
_SIGNING_VARS = (ENV_SECRET, ENV_SECRET_FILE, ENV_KEY, ENV_KEY_FILE)
_BODY_BYTES = 173
"""The size of a no-op trial's request as the broker sends it (a result is 167 bytes)."""


@dataclass(frozen=True)
class _Signing:
    """What each role is given in one signing mode: the broker's and the workers' environment,
    and the front door's signer (it submits and reads the status)."""

    broker: dict[str, str]
    workers: dict[str, str]
    client: Signer


def _signing(mode: str) -> _Signing:
    if mode == "off":
        return _Signing({}, {}, Signer())
    if mode == "secret":
        secret = secrets.token_hex(32)
        return _Signing({ENV_SECRET: secret}, {ENV_SECRET: secret}, Signer(secret.encode()))
    rings = generate_keyrings()
    return _Signing(
        {ENV_KEY: rings[Role.BROKER].to_token()},
        {ENV_KEY: rings[Role.WORKER].to_token()},
        Signer(keyring=rings[Role.CLIENT]),
    )


def signing_cost(url: str, reps: int, n_trials: int) -> dict[str, Any]:
    """The daemon as users run it (its default journal, 2 workers, a no-op objective) with each
    of `SIGNING_MODES`, repetitions interleaved in turns: trials/s, and CPU ms per trial of the
    broker and of the workers; and `seal_open_us`, the cost of one message."""
    for var in _SIGNING_VARS:  # "off" is off, whatever the shell that runs this has set
        os.environ.pop(var, None)
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in SIGNING_MODES}
    modes = list(SIGNING_MODES)
    for rep in range(reps):
        # Each repetition starts with the next mode: no mode always runs first (or last).
        for mode in modes[rep % len(modes) :] + modes[: rep % len(modes)]:
            runs[mode].append(_signed_study(url, n_trials, _signing(mode)))
    medians = {mode: _median(rows) for mode, rows in runs.items()}
    off = medians["off"]
    return {
        "n_trials": n_trials,
        "reps": reps,
        "load_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        **{f"signing_{mode}": medians[mode] for mode in SIGNING_MODES},
        **{f"signing_{mode}_runs": runs[mode] for mode in SIGNING_MODES},
        **{
            f"signing_{mode}_ratio": medians[mode]["trials_per_s"] / off["trials_per_s"]
            for mode in SIGNING_MODES
        },
        "seal_open_us": seal_open_us(),
    }


def _signed_study(url: str, n_trials: int, signing: _Signing) -> dict[str, float]:
    workers = OurWorkers(url, 2, env=signing.workers)
    try:
        broker = _Broker(url, workers.queue, None, env=signing.broker, client_signer=signing.client)
        try:
            processes = {
                "broker": _tree(broker.process.pid),
                "workers": _tree(workers.process.pid),
            }
            before = {kind: _cpu_s(ps) for kind, ps in processes.items()}
            figures = _daemon_study(broker, n_trials)
            cpu = {
                f"{kind}_cpu_ms_per_trial": (_cpu_s(ps) - before[kind]) * 1000 / n_trials
                for kind, ps in processes.items()
            }
            # Nothing refused: a signed run that dropped messages would measure something else.
            refused = connect(url).hgetall(f"{workers.queue}:refused")
            if refused:
                raise RuntimeError(f"messages were refused in a signed run: {refused}")
        finally:
            broker.stop()
    finally:
        workers.stop()
    return {**figures, **cpu}


def _tree(pid: int) -> list[psutil.Process]:
    process = psutil.Process(pid)
    return [process, *process.children(recursive=True)]


def seal_open_us(number: int = 100, repeat: int = 50) -> dict[str, dict[str, float]]:
    """Microseconds to seal and to open one trial request in each of `SIGNING_MODES` (the best
    of `repeat` rounds of `number`, on one core: many short rounds, so that on a shared machine
    some run undisturbed), and the bytes the envelope adds. With keys, the broker seals and a
    worker opens, as a job goes."""
    body = os.urandom(_BODY_BYTES)
    secret = secrets.token_bytes(32)
    rings = generate_keyrings()
    pairs = {
        "off": (Signer(), Signer()),
        "secret": (Signer(secret), Signer(secret)),
        "keys": (Signer(keyring=rings[Role.BROKER]), Signer(keyring=rings[Role.WORKER])),
    }
    figures = {}
    for mode, (sealer, opener) in pairs.items():
        sealed = sealer.seal(Record.REQUEST, body)
        assert opener.open(Record.REQUEST, sealed) == body

        def seal(sealer: Signer = sealer) -> bytes:
            return sealer.seal(Record.REQUEST, body)

        def open_(opener: Signer = opener, sealed: bytes = sealed) -> bytes:
            return opener.open(Record.REQUEST, sealed)

        figures[mode] = {
            "seal_us": min(timeit.repeat(seal, number=number, repeat=repeat)) / number * 1e6,
            "open_us": min(timeit.repeat(open_, number=number, repeat=repeat)) / number * 1e6,
            "bytes_added": float(len(sealed) - len(body)),
        }
    return figures


def signing_cost_lines(d: dict[str, Any]) -> list[str]:
    """The report's section for `signing_cost`'s results."""
    off = d["signing_off"]
    lines = [
        f"## The cost of signing: the daemon on its default journal, no-op objective, "
        f"RandomSampler, 2 workers, {d['n_trials']} trials",
        "",
        "| signing | trials/s | ratio | broker CPU ms/trial (range) | ratio "
        "| workers CPU ms/trial (range) |",
        "|---|---|---|---|---|---|",
    ]
    for mode, label in SIGNING_MODES.items():
        row, runs = d[f"signing_{mode}"], d[f"signing_{mode}_runs"]
        broker, workers = row["broker_cpu_ms_per_trial"], row["workers_cpu_ms_per_trial"]
        lines.append(
            f"| {label} | {row['trials_per_s']:.0f} | {d[f'signing_{mode}_ratio']:.2f}x "
            f"| {broker:.2f} ({_range(runs, 'broker_cpu_ms_per_trial')}) "
            f"| {broker / off['broker_cpu_ms_per_trial']:.2f}x "
            f"| {workers:.2f} ({_range(runs, 'workers_cpu_ms_per_trial')}) |"
        )
    lines += [
        "",
        f"One message ({_BODY_BYTES} bytes, a no-op trial's request), one core, the best of 50 "
        "rounds of 100:",
        "",
        "| signing | seal µs | open µs | bytes added |",
        "|---|---|---|---|",
    ]
    for mode, label in SIGNING_MODES.items():
        one = d["seal_open_us"][mode]
        lines.append(
            f"| {label} | {one['seal_us']:.1f} | {one['open_us']:.1f} | {one['bytes_added']:.0f} |"
        )
    pair = {mode: one["seal_us"] + one["open_us"] for mode, one in d["seal_open_us"].items()}
    lines += [
        "",
        "A trial costs the broker one seal (its job) and one open (its result), and its worker",
        f"the reverse: {pair['keys'] / 1000:.2f} ms each with keys, "
        f"{pair['secret'] / 1000:.3f} ms with the secret, by the figures above.",
        f"Medians of {d['reps']} repetitions, the modes interleaved in turns; load average",
        f"(1 min) {d['load_1m'][0]:.2f} before, {d['load_1m'][1]:.2f} after. Workers' CPU is "
        "the pool and its worker processes.",
    ]
    return lines


def _range(runs: list[dict[str, float]], key: str) -> str:
    values = [run[key] for run in runs]
    return f"{min(values):.2f}-{max(values):.2f}"


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
    parser.add_argument(
        "--batch", type=int, default=1, metavar="N", help="the breakdown's study: --batch N"
    )
    parser.add_argument(
        "--by-process",
        action="store_true",
        help="with --breakdown: Redis commands per trial by the process that sent them (MONITOR)",
    )
    parser.add_argument(
        "--signing",
        action="store_true",
        help="instead: the cost of signing (off, a shared secret, a key per role), per trial "
        "and per message",
    )
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.signing:
        with embedded_redis("bench") as url:
            signing = signing_cost(url, args.reps, args.trials)
        print("\n".join(signing_cost_lines(signing)))
        print(json.dumps(signing, indent=2))
        return
    with embedded_redis("bench") as url:
        results = daemon_overhead(url, args.reps, args.trials)
        parts = breakdown(url, args.trials, args.batch) if args.breakdown else None
    print("\n".join(daemon_overhead_lines(results)))
    if parts is not None:
        print(json.dumps(parts, indent=2))
    if args.breakdown and args.by_process:
        # Imported here: command_sources runs this module's study.
        from benchmarks.command_sources import command_sources, command_sources_lines

        print("\n".join(command_sources_lines(command_sources(args.trials, args.batch), top=40)))


if __name__ == "__main__":
    main()
