"""The study lifecycle through real processes: resubmission, refusals, cancel stopping running
objectives, counts of the budget (studies whose trials cannot run: test_definition_errors.py)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import redis
from optuna.trial import TrialState

from optuna_rq.storage.storage_access import default_storage_url, open_storage
from tests.support.fault_objectives import running_pid
from tests.support.helpers import wait_until

pytestmark = pytest.mark.timeout(180)

X = "x={type: float, low: -10, high: 10}"
BOTH = ("tests.support.objectives", "tests.support.fault_objectives")


def status_of(run_cli, name: str) -> dict:
    result = run_cli("status", name, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def quadratic(name: str, *extra: str) -> tuple[str, ...]:
    return (
        "submit",
        "tests.support.objectives:quadratic",
        "--param",
        X,
        "--study-name",
        name,
        *extra,
    )


def sleeper(name: str, redis_url: str, key: str, *extra: str) -> tuple[str, ...]:
    """A study whose trials sleep ten minutes: only a cancel that stops them lets it end."""
    return (
        "submit",
        "tests.support.fault_objectives:steady",
        "--param",
        X,
        "--param",
        f"redis_url={redis_url}",
        "--param",
        f"key={key}",
        "--param",
        "hold_s=600",
        "--study-name",
        name,
        *extra,
    )


def test_resubmitting_a_finished_study_waits_for_the_new_total(
    run_cli, broker_process, workers_factory, conn: redis.Redis
) -> None:
    prefix = workers_factory(count=2)
    first = run_cli(*quadratic("again", "--n-trials", "4", "--concurrency", "2", "--wait"))
    assert first.returncode == 0, first.stderr
    assert status_of(run_cli, "again")["state"] == "finished"
    more = run_cli(*quadratic("again", "--n-trials", "9", "--concurrency", "2", "--wait"))
    assert more.returncode == 0, more.stderr
    assert "finished: 9 trials" in more.stderr
    snapshot = status_of(run_cli, "again")  # the moment `--wait` returns, not eventually
    assert (snapshot["state"], snapshot["complete"], snapshot["n_trials"]) == ("finished", 9, 9)
    # Each submission also woke the broker with an empty entry on its result stream: read,
    # acknowledged and deleted like the results, never taken for one.
    wait_until(lambda: conn.xlen(f"{prefix}:results") == 0, timeout_s=30)
    assert conn.hget(f"{prefix}:refused", "result") is None


def test_another_definition_is_refused_naming_it_and_the_study_is_left_as_it_was(
    run_cli, broker_process, workers_factory, redis_url: str, prefix: str
) -> None:
    workers_factory(count=1, modules=BOTH)
    assert (
        run_cli(*quadratic("done", "--n-trials", "3", "--concurrency", "1", "--wait")).returncode
        == 0
    )
    before = status_of(run_cli, "done")
    refused = run_cli(
        *quadratic("done", "--n-trials", "6", "--concurrency", "1", "--direction", "maximize")
    )
    assert refused.returncode == 1
    assert "another definition" in refused.stderr and "directions" in refused.stderr
    after = status_of(run_cli, "done")
    assert {k: v for k, v in after.items() if k != "updated_at"} == {
        k: v for k, v in before.items() if k != "updated_at"
    }

    # A running study: another space is refused, and its trials keep the space they had.
    assert (
        run_cli(
            *sleeper("busy", redis_url, prefix, "--n-trials", "5", "--concurrency", "1")
        ).returncode
        == 0
    )
    wait_until(lambda: status_of(run_cli, "busy")["running"] == 1, timeout_s=60)
    other = run_cli(
        "submit",
        "tests.support.fault_objectives:steady",
        "--param",
        "x={type: float, low: 0, high: 1}",
        "--param",
        f"redis_url={redis_url}",
        "--param",
        f"key={prefix}",
        "--param",
        "hold_s=600",
        "--study-name",
        "busy",
        "--n-trials",
        "5",
        "--concurrency",
        "1",
    )
    assert other.returncode == 1 and "space (x differ)" in other.stderr
    sampler = run_cli(
        *sleeper(
            "busy",
            redis_url,
            prefix,
            "--n-trials",
            "5",
            "--concurrency",
            "1",
            "--sampler",
            "random",
        )
    )
    assert sampler.returncode == 1 and "sampler 'tpe', not 'random'" in sampler.stderr
    assert status_of(run_cli, "busy")["state"] == "running"
    assert run_cli("cancel", "busy").returncode == 0


def test_cancel_and_set_on_a_finished_study_say_so_and_change_nothing(
    run_cli, broker_process, workers_factory
) -> None:
    workers_factory(count=1)
    assert (
        run_cli(*quadratic("over", "--n-trials", "2", "--concurrency", "1", "--wait")).returncode
        == 0
    )
    before = status_of(run_cli, "over")
    cancelled = run_cli("cancel", "over")
    assert cancelled.returncode == 2 and "'over' is finished: `cancel`" in cancelled.stderr
    changed = run_cli("set", "over", "--n-trials", "5")
    assert changed.returncode == 2 and "resubmitting it" in changed.stderr
    waited = run_cli("wait", "over", "--timeout", "30")
    assert waited.returncode == 0, waited.stderr
    after = status_of(run_cli, "over")
    assert (after["state"], after["complete"], after["n_trials"], after["best_value"]) == (
        "finished",
        2,
        2,
        before["best_value"],
    )


def test_cancel_stops_the_running_objective_and_its_worker_serves_on(
    run_cli,
    broker_process,
    workers_factory,
    conn: redis.Redis,
    redis_url: str,
    prefix: str,
    cli_state: Path,
) -> None:
    workers_factory(count=1, modules=BOTH)
    assert (
        run_cli(
            *sleeper("slow", redis_url, prefix, "--n-trials", "3", "--concurrency", "1")
        ).returncode
        == 0
    )
    wait_until(lambda: conn.llen(f"{prefix}:started") == 1, timeout_s=60)
    pid = int(conn.lindex(f"{prefix}:started", 0).split()[0])
    assert run_cli("cancel", "slow").returncode == 0
    wait_until(lambda: not running_pid(pid), timeout_s=30, message="the objective still runs")
    # The one worker takes the next study's trials: it was not left running the ten minutes.
    after = run_cli(*quadratic("next", "--n-trials", "2", "--concurrency", "1", "--wait"))
    assert after.returncode == 0, after.stderr
    study = optuna.load_study(
        study_name="slow", storage=open_storage(default_storage_url(cli_state))
    )
    # The running trial, and any queued behind it, end FAIL cancelled.
    assert study.trials[0].user_attrs.get("fail_reason") == "cancelled"
    assert {(t.state, t.user_attrs.get("fail_reason")) for t in study.trials} == {
        (TrialState.FAIL, "cancelled")
    }


def test_counts_are_of_the_budget_and_a_study_without_a_complete_trial_exits_non_zero(
    run_cli, broker_process, workers_factory, redis_url: str, prefix: str
) -> None:
    workers_factory(count=2, modules=BOTH)
    lost = run_cli(
        "submit",
        "tests.support.fault_objectives:exits",
        "--param",
        X,
        "--param",
        f"redis_url={redis_url}",
        "--param",
        f"key={prefix}",
        "--n-trials",
        "1",
        "--concurrency",
        "1",
        "--max-retries",
        "2",
        "--study-name",
        "lost",
        "--wait",
    )
    assert lost.returncode == 1
    assert "finished without a complete trial" in lost.stderr and "worker_lost 3" in lost.stderr
    snapshot = status_of(run_cli, "lost")
    assert (snapshot["ended"], snapshot["n_trials"], snapshot["retries"]) == (1, 1, 2)
    assert snapshot["fail_reasons"] == {"worker_lost": 3}
    table = run_cli("status", "lost")
    assert "1/1 done" in table.stdout and "2 retries" in table.stdout
