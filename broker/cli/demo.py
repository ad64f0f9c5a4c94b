"""The demo: a private embedded Redis, two worker processes and a remote study, then clean up.

It is what a newcomer runs first, so it shows progress, prints the best trial and the commands to
go further, and leaves nothing running, whatever happens.
"""

from __future__ import annotations

import importlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from optuna_rq.client import BrokerClient
from optuna_rq.errors import ConfigError, OptunaRQError
from optuna_rq.plumbing.connection import connect
from optuna_rq.plumbing.embedded import ensure_embedded, stop_embedded
from optuna_rq.plumbing.locations import ENV_REDIS_PASSWORD, ENV_REDIS_PASSWORD_FILE
from optuna_rq.protocol import StudySpec
from optuna_rq.space.declarations import suggest
from optuna_rq.space.space_files import space_to_data
from optuna_rq.terminal.progress import follow
from optuna_rq.terminal.study_bar import make_console

DEMO_OBJECTIVE = "optuna_rq.examples.rosenbrock:objective"
DEMO_PREFIX = "optuna-rq-demo"
_WATCH_S = 0.2


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


def _start(args: list[str], redis_url: str, state: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, OPTUNA_RQ_STATE_DIR=str(state))
    for name in (ENV_REDIS_PASSWORD, ENV_REDIS_PASSWORD_FILE):  # the demo's Redis takes none
        env.pop(name, None)
    argv = [
        sys.executable,
        "-m",
        "optuna_rq.cli.app",
        "--redis-url",
        redis_url,
        "--prefix",
        DEMO_PREFIX,
    ]
    return subprocess.Popen([*argv, *args, "--log-level", "WARNING"], env=env)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _check_objective_imports(module: str) -> None:
    """Import the demo's objective here, as its workers will, and say so at once if it fails."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise ConfigError(
            f"the demo's objective module {module!r} cannot be imported ({exc}); "
            "reinstall optuna-rq, whose wheel ships it"
        ) from exc


def _watch_workers(
    workers: subprocess.Popen[bytes], client: BrokerClient, study: str, stopped: threading.Event
) -> threading.Thread:
    """Cancel `study` as soon as `workers` exits on its own: nothing else would run its trials."""

    def watch() -> None:
        while not stopped.wait(_WATCH_S):
            if workers.poll() is not None:
                client.cancel(study)
                return

    thread = threading.Thread(target=watch, name="demo-workers-watch", daemon=True)
    thread.start()
    return thread


def next_commands() -> str:
    """The commands to go further, as this user types them: through `uv run` if that is how
    the demo started, else the `optuna-rq` on PATH, else this interpreter's module."""
    if os.environ.get("UV"):  # uv sets it in what `uv run` starts
        command = "uv run optuna-rq"
    elif shutil.which("optuna-rq"):
        command = "optuna-rq"
    else:
        command = f"{sys.executable} -m optuna_rq.cli.app"
    return (
        "\nNext, on your own objective (see README.md; the logs go to files so that they do not "
        "run through the progress bar):\n"
        f"  {command} broker > broker.log 2>&1 &\n"
        f"  {command} workers --import mypkg.train --count 4 > workers.log 2>&1 &\n"
        f"  {command} submit mypkg.train:objective --space space.yaml "
        "--n-trials 100 --concurrency 4 --wait"
    )


def run_demo(*, n_trials: int = 60, concurrency: int = 4, workers: int = 2) -> dict[str, Any]:
    """Run the demo study end to end and return its final status; everything started stops."""
    console = make_console(stderr=True)
    state = Path(tempfile.mkdtemp(prefix="orq-demo-", dir="/tmp"))
    started: list[subprocess.Popen[bytes]] = []
    stopped = threading.Event()
    module = DEMO_OBJECTIVE.partition(":")[0]
    _check_objective_imports(module)
    try:
        console.print(f"[bold]optuna-rq demo[/]: embedded Redis under {state}")
        redis_url = ensure_embedded(state)
        connection = connect(redis_url)
        started.append(_start(["broker"], redis_url, state))
        pool = _start(["workers", "--import", module, "--count", str(workers)], redis_url, state)
        started.append(pool)
        spec = StudySpec(
            name="demo",
            objective=DEMO_OBJECTIVE,
            space=space_to_data(demo_space()),
            n_trials=n_trials,
            concurrency=concurrency,
            seed=0,
        )
        client = BrokerClient(connection, DEMO_PREFIX)
        client.submit(spec)
        _watch_workers(pool, client, spec.name, stopped)
        console.print(
            f"a broker, {workers} workers, and {n_trials} trials of {DEMO_OBJECTIVE}, "
            f"at most {concurrency} at once"
        )
        code = follow(client, spec.name, timeout_s=300, console=console, submitted=spec)
        if pool.poll() is not None:
            raise OptunaRQError(
                f"the demo's workers exited with code {pool.returncode} (their error is above)"
            )
        status = client.status(spec.name)
        if code != 0 or status is None or status.best_value is None:
            ended = f"{status.state.value}: {status.error}" if status else "gone"
            raise OptunaRQError(f"the demo study ended {ended}")
        console.print(f"[bold green]best value[/] {status.best_value:.6g}")
        best_params: Any = status.best_params
        for name, value in sorted(best_params.items()):
            console.print(f"  {name} = {value!r}")
        console.print(next_commands())
        return status.to_dict()
    finally:
        stopped.set()
        for process in reversed(started):
            _stop(process)
        stop_embedded(state)
        shutil.rmtree(state, ignore_errors=True)
