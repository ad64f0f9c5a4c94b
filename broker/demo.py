"""The demo: a private embedded Redis, two worker processes and a remote study, then clean up.

It is what a newcomer runs first, so it shows progress, prints the best trial and the commands to
go further, and leaves nothing running, whatever happens.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from broker.connection import connect, ensure_embedded, stop_embedded
from broker.optimizer import Optimizer
from broker.space import suggest
from broker.verdict import FAIL_REASON_ATTR

DEMO_OBJECTIVE = "examples.rosenbrock:objective"
DEMO_QUEUE = "optuna-rq-demo"
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def demo_space() -> dict[str, object]:
    """The demo's nested search space: sampled values, and fixed ones next to them."""
    return {
        "x": suggest.float(-2.0, 2.0),
        "y": suggest.float(-1.0, 3.0),
        "model": {
            "lr": suggest.float(1e-4, 1e-1, log=True),
            "depth": suggest.integer(2, 8, step=2),
            "booster": suggest.category(["gbtree", "dart"]),
        },
        "noise": 0.001,
    }


def _start_workers(redis_url: str, count: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PROJECT_ROOT), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "broker.cli", "--redis-url", redis_url, "workers"]
        + ["--import", DEMO_OBJECTIVE.partition(":")[0], "--count", str(count)]
        + ["--queue", DEMO_QUEUE, "--log-level", "WARNING"],
        env=env,
    )


def _stop_workers(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def _run_with_progress(optimizer: Optimizer, console: Console) -> None:
    study = optimizer.study
    assert study is not None
    columns = (
        TextColumn("[bold]trials"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("best {task.fields[best]}  failed {task.fields[failed]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task("trials", total=optimizer.n_trials, best="-", failed=0)
        run = asyncio.create_task(optimizer(**demo_space()))
        while True:
            done, _ = await asyncio.wait({run}, timeout=0.2)
            finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
            complete = [t for t in finished if t.state is optuna.trial.TrialState.COMPLETE]
            best = (
                f"{min(t.value for t in complete if t.value is not None):.4g}" if complete else "-"
            )
            failed = len([t for t in finished if t.state is optuna.trial.TrialState.FAIL])
            progress.update(bar, completed=len(finished), best=best, failed=failed)
            if done:
                run.result()
                return


def run_demo(*, n_trials: int = 60, concurrency: int = 4, workers: int = 2) -> optuna.Study:
    """Run the demo study end to end and return it; everything started is stopped on return."""
    console = Console()
    state = Path(tempfile.mkdtemp(prefix="orq-demo-", dir="/tmp"))
    workers_process: subprocess.Popen[bytes] | None = None
    try:
        console.print(f"[bold]optuna-rq demo[/]: embedded Redis under {state}")
        redis_url = ensure_embedded(state)
        workers_process = _start_workers(redis_url, workers)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        optimizer = Optimizer(
            DEMO_OBJECTIVE,
            concurrency=concurrency,
            n_trials=n_trials,
            connection=connect(redis_url),
            queue=DEMO_QUEUE,
        )
        console.print(
            f"{workers} workers, {n_trials} trials of {DEMO_OBJECTIVE}, "
            f"at most {concurrency} at once"
        )
        asyncio.run(_run_with_progress(optimizer, console))
        study = optimizer.study
        assert study is not None
        best = study.best_trial
        console.print(f"[bold green]best value[/] {best.value:.6g} (trial {best.number})")
        for name, value in sorted(best.params.items()):
            console.print(f"  {name} = {value!r}")
        reasons = [t.user_attrs.get(FAIL_REASON_ATTR) for t in study.trials]
        if any(reasons):
            console.print(f"failed trials: {sum(1 for r in reasons if r)}")
        console.print(
            "\nNext: start workers for your own module and run a study on them:\n"
            "  optuna-rq workers --import mypkg.train --count 4\n"
            '  Optimizer("mypkg.train:objective", concurrency=4, n_trials=100, redis_url=...)'
        )
        return study
    finally:
        if workers_process is not None:
            _stop_workers(workers_process)
        stop_embedded(state)
        shutil.rmtree(state, ignore_errors=True)
