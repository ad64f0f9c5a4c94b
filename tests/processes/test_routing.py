"""Routing through real processes: every trial reaches a worker that serves its objective and its
resource class; GPUs per worker process; live workers by heartbeat; autoscaling; import paths."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import optuna
import pytest
import redis
from optuna.trial import TrialState

from optuna_rq.storage.storage_access import default_storage_url, open_storage
from optuna_rq.study.verdict import FAIL_REASON_ATTR
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, cli_env, live_workers, stop_process

pytestmark = pytest.mark.timeout(240)


def submit(run_cli, objective: str, name: str, *args: str) -> None:
    result = run_cli(
        "submit", objective, "--study-name", name, "--seed", "1", "--concurrency", "2", *args
    )
    assert result.returncode == 0, result.stderr


def status_of(run_cli, name: str) -> dict:
    result = run_cli("status", name, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def finished(run_cli, name: str) -> bool:
    return status_of(run_cli, name)["state"] == "finished"


def trials_of(cli_state: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = open_storage(default_storage_url(cli_state))
    return optuna.load_study(study_name=name, storage=storage).trials


def test_pools_serving_different_modules_each_take_only_their_own_trials(
    run_cli, broker_process, workers_factory, cli_state: Path
) -> None:
    workers_factory(count=1, modules=("tests.support.objectives",))
    workers_factory(count=1, modules=("tests.support.routing_objectives",))
    x = "x={type: float, low: -10, high: 10}"
    submit(run_cli, "tests.support.objectives:quadratic", "a", "--param", x, "--n-trials", "12")
    submit(run_cli, "tests.support.routing_objectives:where", "b", "--n-trials", "12")
    wait_until(lambda: finished(run_cli, "a") and finished(run_cli, "b"), timeout_s=120)

    for name in ("a", "b"):
        trials = trials_of(cli_state, name)
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 12, [
            t.user_attrs.get(FAIL_REASON_ATTR) for t in trials
        ]
        assert status_of(run_cli, name)["fail_reasons"] == {}


def test_a_gpu_class_study_runs_only_on_the_gpu_class_pool(
    run_cli, broker_process, workers_factory, cli_state: Path
) -> None:
    module = ("tests.support.routing_objectives",)
    workers_factory(count=1, modules=module, env={"POOL": "cpu"})
    workers_factory(count=1, modules=module, env={"POOL": "gpu"}, args=("--queue", "gpu"))
    submit(
        run_cli,
        "tests.support.routing_objectives:where",
        "on-gpu",
        "--queue",
        "gpu",
        "--n-trials",
        "6",
    )
    submit(run_cli, "tests.support.routing_objectives:where", "on-cpu", "--n-trials", "6")
    wait_until(lambda: finished(run_cli, "on-gpu") and finished(run_cli, "on-cpu"), timeout_s=120)

    assert {t.user_attrs["pool"] for t in trials_of(cli_state, "on-gpu")} == {"gpu"}
    assert {t.user_attrs["pool"] for t in trials_of(cli_state, "on-cpu")} == {"cpu"}
    assert status_of(run_cli, "on-gpu")["queue"] == "gpu"


def test_a_study_no_worker_listens_to_waits_for_one_and_then_runs(
    run_cli, broker_process, workers_factory, cli_state: Path
) -> None:
    workers_factory(
        count=1, modules=("tests.support.objectives",)
    )  # the wrong module for this study
    submit(run_cli, "tests.support.routing_objectives:where", "waits", "--n-trials", "3")
    wait_until(lambda: status_of(run_cli, "waits")["waiting_for_workers"], timeout_s=30)
    shown = run_cli("status", "waits").stdout
    assert "waiting for a worker" in shown, shown
    assert "start one: optuna-rq workers --import tests.support.routing_objectives" in shown, shown
    # What the live workers serve instead, where a misspelt module would show.
    assert "(live workers on queue 'default' serve tests.support.objectives)" in shown, shown
    assert status_of(run_cli, "waits")["failed"] == 0  # waiting, never failed for it

    workers_factory(count=1, modules=("tests.support.routing_objectives",))
    wait_until(lambda: finished(run_cli, "waits"), timeout_s=60)
    assert [t.state for t in trials_of(cli_state, "waits")] == [TrialState.COMPLETE] * 3
    assert not status_of(run_cli, "waits")["waiting_for_workers"]


def test_each_worker_process_of_a_gpus_pool_sees_its_own_devices(
    run_cli, broker_process, workers_factory, cli_state: Path
) -> None:
    workers_factory(
        count=2,
        modules=("tests.support.routing_objectives",),
        env={"CUDA_VISIBLE_DEVICES": "4,5,6,7"},  # the pool's allocation, shared out in pairs
        args=("--gpus", "all", "--gpus-per-trial", "2"),
    )
    submit(
        run_cli,
        "tests.support.routing_objectives:where",
        "gpus",
        "--n-trials",
        "8",
        "--concurrency",
        "2",
        "--param",
        "hold_s=0.2",
    )
    wait_until(lambda: finished(run_cli, "gpus"), timeout_s=120)

    seen: dict[int, set[str]] = {}
    for trial in trials_of(cli_state, "gpus"):
        seen.setdefault(trial.user_attrs["pid"], set()).add(trial.user_attrs["gpus"])
    assert sorted(d for devices in seen.values() for d in devices) == ["4,5", "6,7"]
    assert all(len(devices) == 1 for devices in seen.values())  # one process, one device set


@pytest.mark.timeout(120)
def test_a_sigkilled_pool_leaves_the_live_workers_within_the_lease_ttl(
    redis_url: str, prefix: str, conn: redis.Redis
) -> None:
    ttl_s = 2.0
    pool = subprocess.Popen(
        cli(
            "--redis-url",
            redis_url,
            "--prefix",
            prefix,
            "workers",
            "--import",
            "tests.support.objectives",
            "--count",
            "2",
            "--lease-ttl",
            str(ttl_s),
        ),
        env=cli_env(),
    )
    try:
        wait_until(lambda: live_workers(conn, prefix) == 2, timeout_s=60)
        pool.send_signal(signal.SIGKILL)
        pool.wait()
        # RQ's own registrations would count these workers for 420 s more.
        wait_until(lambda: live_workers(conn, prefix) == 0, timeout_s=ttl_s + 3)
    finally:
        pool.kill()
        pool.wait()


def test_an_autoscaled_pool_grows_under_load_and_shrinks_when_idle(
    run_cli, broker_process, redis_url: str, prefix: str, conn: redis.Redis, cli_state: Path
) -> None:
    pool = subprocess.Popen(
        cli(
            "--redis-url",
            redis_url,
            "--prefix",
            prefix,
            "workers",
            "--import",
            "tests.support.routing_objectives",
            "--autoscale",
            "3,1",  # Celery's MAX,MIN
            "--scale-down-after",
            "1",
            "--lease-ttl",
            "2",
        ),
        env=cli_env(),
    )
    try:
        wait_until(lambda: live_workers(conn, prefix) == 1, timeout_s=60)
        submit(
            run_cli,
            "tests.support.routing_objectives:where",
            "load",
            "--n-trials",
            "24",
            "--concurrency",
            "3",
            "--param",
            "hold_s=0.5",
        )
        wait_until(lambda: live_workers(conn, prefix) == 3, timeout_s=60, message="it grew")
        wait_until(lambda: finished(run_cli, "load"), timeout_s=120)
        wait_until(lambda: live_workers(conn, prefix) == 1, timeout_s=30, message="it shrank")
        trials = trials_of(cli_state, "load")
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 24
        assert len({t.user_attrs["pid"] for t in trials}) >= 2  # more than one process ran them
    finally:
        assert stop_process(pool) == 0


def test_workers_import_from_the_current_directory_and_from_path(
    redis_url: str, prefix: str, conn: redis.Redis, tmp_path: Path
) -> None:
    here, there = tmp_path / "here", tmp_path / "there"
    for folder, module in ((here, "mine_here"), (there, "mine_there")):
        folder.mkdir()
        (folder / f"{module}.py").write_text("def objective(x: float) -> float:\n    return x\n")
    pool = subprocess.Popen(
        cli("--redis-url", redis_url, "--prefix", prefix, "workers", "--import", "mine_here")
        + ["--import", "mine_there", "--path", str(there)],
        env=cli_env(),
        cwd=here,
    )
    try:
        wait_until(lambda: live_workers(conn, prefix) == 1, timeout_s=60)
    finally:
        assert stop_process(pool) == 0
    assert live_workers(conn, prefix) == 0  # a clean stop takes its heartbeat with it


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (
            (
                "--gpus-per-trial",
                "2",
            ),
            "--gpus-per-trial needs --gpus",
        ),
        (("--queue", "g p u"), "--queue 'g p u'"),
        (("--autoscale", "3,1,2"), "--autoscale '3,1,2'"),
        (("--autoscale", "1,2", "--count", "2"), "not both"),
        (("--path", "/no/such/dir"), "--path '/no/such/dir' is not a directory"),
    ],
)
def test_workers_refuse_bad_routing_options_naming_them(
    run_cli, args: tuple[str, ...], text: str
) -> None:
    result = run_cli("workers", "--import", "tests.support.objectives", *args, timeout_s=60)
    assert result.returncode == 2, result.stderr
    assert text in result.stderr


def test_submit_refuses_a_bad_queue_name(run_cli) -> None:
    result = run_cli("submit", "m:f", "--n-trials", "1", "--concurrency", "1", "--queue", "a b")
    assert result.returncode == 2
    assert "--queue 'a b'" in result.stderr
