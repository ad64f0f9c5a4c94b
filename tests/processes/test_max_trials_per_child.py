"""`optuna-rq workers --max-trials-per-child N`: each worker process is replaced by a fresh one
after N trials, which imports the objective again: how an edited objective is picked up. With
real processes: a broker, a pool serving a module written by the test, studies run through the
CLI; and the pool's log line for each trial's start."""

from __future__ import annotations

import collections
import re
import subprocess
import textwrap
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import redis

from optuna_rq.errors import ConfigError
from optuna_rq.storage.storage_access import default_storage_url, open_storage
from optuna_rq.workers.pool import WorkerSettings
from tests.support.terminal_pool import TerminalPool
from tests.support.worker_processes import cli, cli_env

pytestmark = pytest.mark.timeout(240)

MODULE = "edited_objective"


def _write_objective(directory: Path, value: float) -> None:
    (directory / f"{MODULE}.py").write_text(
        textwrap.dedent(
            f"""
            import os

            def objective(trial):
                trial.set_user_attr("pid", os.getpid())
                trial.suggest_float("x", 0, 1)
                return {value!r}
            """
        )
    )


def _run_study(
    run_cli: Callable[..., subprocess.CompletedProcess[str]], name: str, n_trials: int
) -> None:
    done = run_cli(
        "submit",
        f"{MODULE}:objective",
        "--study-name",
        name,
        "--n-trials",
        str(n_trials),
        "--concurrency",
        "1",
        "--wait",
    )
    assert done.returncode == 0, done.stderr


def test_each_worker_process_is_replaced_after_its_trials_and_an_edit_is_picked_up(
    redis_url: str,
    prefix: str,
    conn: redis.Redis,
    broker_process: object,
    run_cli: Callable[..., subprocess.CompletedProcess[str]],
    cli_state: Path,
    tmp_path: Path,
) -> None:
    code = tmp_path / "code"
    code.mkdir()
    _write_objective(code, 1.0)
    args = ["--count", "1", "--path", str(code), "--max-trials-per-child", "2"]
    pool = TerminalPool(
        redis_url, prefix, args, log=tmp_path / "pool.log", env=cli_env(), module=MODULE
    )
    try:
        pool.wait_ready(conn, 1)
        _run_study(run_cli, "before", 5)
        _write_objective(code, 22.0)  # edited while the pool runs
        _run_study(run_cli, "after", 4)
        pool.sigterm()
        assert pool.wait() == 0, pool.text()
    finally:
        if pool.process.poll() is None:
            pool.kill()
    storage = open_storage(default_storage_url(cli_state))
    before = optuna.load_study(study_name="before", storage=storage).trials
    after = optuna.load_study(study_name="after", storage=storage).trials
    text = pool.text()

    # No process ran more than 2 trials; each that ran 2 was replaced, and said so, not as a crash.
    runs = collections.Counter(t.user_attrs["pid"] for t in before + after)
    assert max(runs.values()) == 2 and len(runs) >= 5, runs
    replaced = re.findall(r"took its 2 trials \(--max-trials-per-child\): replacing it", text)
    assert len(replaced) == sum(1 for n in runs.values() if n == 2), text
    assert "exited with code" not in text and "stuck" not in text, text

    assert [t.value for t in before] == [1.0] * 5
    # The edit reaches every process within its 2 trials: the one that imported the module
    # before the edit may run one more of the old trials, none after it.
    values = [t.value for t in after]
    assert values[-2:] == [22.0, 22.0] and set(values) <= {1.0, 22.0}, values
    first_new = values.index(22.0)
    assert all(v == 22.0 for v in values[first_new:]), values

    # Each trial's start is logged, with its study, trial, attempt and process.
    for name, trials in (("before", before), ("after", after)):
        for trial in trials:
            line = (
                f"study {name!r} trial {trial.number} (attempt 1): "
                f"started in pid {trial.user_attrs['pid']}"
            )
            assert line in text, (line, text)


@pytest.mark.parametrize("limit", [0, -1, True, 1.5])
def test_a_limit_that_is_not_a_count_is_refused(limit: object) -> None:
    with pytest.raises(ConfigError, match="--max-trials-per-child must be an integer >= 1"):
        WorkerSettings(redis_url="unix:///nowhere", modules=("m",), max_trials_per_child=limit)  # type: ignore[arg-type]


def test_the_command_refuses_a_limit_below_one() -> None:
    result = subprocess.run(
        cli("workers", "--import", "tests.support.objectives", "--max-trials-per-child", "0"),
        env=cli_env(OPTUNA_RQ_REDIS_URL="redis://127.0.0.1:1/0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "Invalid value for '--max-trials-per-child'" in result.stderr, result.stderr
