"""Remote studies end to end: a real redis-server, real worker processes started by the CLI."""

from __future__ import annotations

import asyncio
import logging
import threading

import optuna
import pytest
import redis
from optuna.trial import TrialState

from optuna_rq import ConfigError, Optimizer, suggest
from optuna_rq.study.verdict import FAIL_ERROR_ATTR, FAIL_REASON_ATTR
from tests.support import objectives
from tests.support.helpers import wait_until

pytestmark = pytest.mark.timeout(120)


def remote(objective: object, queue: str, redis_url: str, **kwargs: object) -> Optimizer:
    return Optimizer(objective, redis_url=redis_url, prefix=queue, **kwargs)  # type: ignore[arg-type]


def test_a_remote_study_finishes_with_exactly_n_trials_complete(
    redis_url: str, workers_factory
) -> None:
    queue = workers_factory(count=2)
    opt = remote("tests.support.objectives:quadratic", queue, redis_url, concurrency=3, n_trials=30)
    opt.run(x=suggest.float(-10, 10), depth=suggest.integer(0, 3))
    trials = opt.study.trials
    assert len(trials) == 30
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 30
    assert all(
        t.value == pytest.approx((t.params["x"] - 2) ** 2 + t.params["depth"]) for t in trials
    )


def test_the_cap_holds_as_measured_by_the_objectives(
    redis_url: str, conn: redis.Redis, prefix: str, workers_factory
) -> None:
    queue = workers_factory(count=5)
    opt = remote("tests.support.objectives:capped", queue, redis_url, concurrency=3, n_trials=24)
    opt.run(x=suggest.float(0, 1), redis_url=redis_url, key=prefix, hold_s=0.05)
    samples = [int(v) for v in conn.lrange(f"{prefix}:samples", 0, -1)]
    assert len(samples) == 24
    assert max(samples) <= 3, samples
    assert max(samples) == 3, f"five workers never ran three trials at once: {samples}"
    assert all(t.state is TrialState.COMPLETE for t in opt.study.trials)


def test_multi_objective_on_workers(redis_url: str, workers_factory) -> None:
    queue = workers_factory(count=2)
    study = optuna.create_study(directions=["minimize", "minimize"])
    opt = remote(objectives.pair, queue, redis_url, concurrency=2, n_trials=8, study=study)
    opt.run(x=suggest.float(-1, 1), y=suggest.float(0, 2))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 8
    assert all(
        t.values == pytest.approx([t.params["x"] ** 2, (t.params["y"] - 1) ** 2])
        for t in study.trials
    )


@pytest.mark.parametrize(
    ("objective", "reason", "text"),
    [
        ("tests.support.objectives:raises", "exception", "ValueError: objective refuses x="),
        ("tests.support.objectives:returns_str", "bad_return", "expected a float"),
        ("tests.support.objectives:returns_nan", "bad_return", "The value nan is not acceptable"),
        ("tests.support.objectives:not_there", "import_error", "has no function 'not_there'"),
    ],
)
def test_failures_are_told_fail_with_their_reason(
    redis_url: str, workers_factory, objective: str, reason: str, text: str
) -> None:
    queue = workers_factory(count=1)
    opt = remote(objective, queue, redis_url, concurrency=2, n_trials=3)
    opt.run(x=suggest.float(0, 1))
    trials = opt.study.trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 3
    assert {t.user_attrs[FAIL_REASON_ATTR] for t in trials} == {reason}
    assert all(text in t.user_attrs[FAIL_ERROR_ATTR] for t in trials)


def test_pruned_on_a_worker_is_told_pruned(redis_url: str, workers_factory) -> None:
    queue = workers_factory(count=1)
    opt = remote("tests.support.objectives:prunes", queue, redis_url, concurrency=1, n_trials=2)
    opt.run(x=suggest.float(0, 1))
    assert [t.state for t in opt.study.trials] == [TrialState.PRUNED] * 2


def test_nested_inputs_arrive_nested_and_are_recorded_dotted(
    redis_url: str, workers_factory
) -> None:
    queue = workers_factory(count=2)
    opt = remote("tests.support.objectives:nested", queue, redis_url, concurrency=2, n_trials=6)
    opt.run(
        model={
            "name": "mlp",
            "lr": suggest.float(1e-4, 1e-1, log=True),
            "layers": {"units": suggest.integer(8, 64, step=8)},
        },
        seed=42,
    )
    trials = opt.study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6, [
        t.user_attrs.get(FAIL_ERROR_ATTR) for t in trials
    ]
    assert set(trials[0].params) == {"model.lr", "model.layers.units"}
    assert all(
        t.value == pytest.approx(t.params["model.lr"] * t.params["model.layers.units"])
        for t in trials
    )


def test_async_objective_and_flytekit_task_run_on_workers(redis_url: str, workers_factory) -> None:
    pytest.importorskip("flytekit", reason="the `flyte` extra is not installed")
    from tests.support import flyte_objectives

    queue = workers_factory(
        count=2, modules=("tests.support.objectives", "tests.support.flyte_objectives")
    )
    opt = remote(objectives.async_quadratic, queue, redis_url, concurrency=2, n_trials=4)
    opt.run(x=suggest.float(-1, 1))
    assert (
        all(t.value == pytest.approx((t.params["x"] - 1) ** 2) for t in opt.study.trials)
        and len(opt.study.trials) == 4
    )

    task_opt = remote(flyte_objectives.task_quadratic, queue, redis_url, concurrency=2, n_trials=4)
    assert task_opt.is_imperative
    task_opt.run(x=suggest.float(-1, 1), depth=suggest.integer(0, 2))
    trials = task_opt.study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4, [
        t.user_attrs.get(FAIL_ERROR_ATTR) for t in trials
    ]
    assert all(
        t.value == pytest.approx((t.params["x"] - 3) ** 2 + t.params["depth"]) for t in trials
    )


def test_a_fixed_input_msgpack_cannot_carry_is_refused_before_any_trial(
    redis_url: str, prefix: str
) -> None:
    opt = remote("tests.support.objectives:quadratic", prefix, redis_url, concurrency=1, n_trials=1)
    with pytest.raises(ConfigError, match="model.layers"):
        opt.run(x=suggest.float(0, 1), model={"layers": {1, 2}})
    assert opt.study.trials == []


def test_remote_objective_paths_are_checked_up_front(redis_url: str) -> None:
    with pytest.raises(ConfigError, match="has no ':'"):
        Optimizer("tests.support.objectives.quadratic", 1, 1, redis_url=redis_url)
    with pytest.raises(ConfigError, match="cannot be imported by workers"):
        Optimizer(lambda x: x, 1, 1, redis_url=redis_url)


def test_cancelling_a_remote_run_leaves_no_trial_running(
    redis_url: str, conn: redis.Redis, prefix: str
) -> None:
    # no workers serve this queue: the trials stay queued until the run is cancelled
    opt = remote("tests.support.objectives:quadratic", prefix, redis_url, concurrency=2, n_trials=5)

    async def main() -> None:
        task = asyncio.create_task(opt(x=suggest.float(0, 1)))
        while len(opt.study.trials) < 2:  # two sent: the cap, and none asked ahead
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    trials = opt.study.trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    assert {t.user_attrs[FAIL_REASON_ATTR] for t in trials} == {"cancelled"}
    from optuna_rq.protocol import Keys, trial_queue

    assert trial_queue(conn, Keys(prefix).trial_queue("tests.support.objectives")).count == 0


def test_a_remote_run_without_a_worker_says_what_it_waits_for_then_runs_on_one(
    redis_url: str, prefix: str, workers_factory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="optuna_rq.optimizer")
    opt = remote("tests.support.objectives:quadratic", prefix, redis_url, concurrency=2, n_trials=4)
    run = threading.Thread(target=opt.run, kwargs={"x": suggest.float(0, 1)}, daemon=True)
    run.start()
    queue = f"{prefix}:default:tests.support.objectives"

    def said_so() -> list[str]:
        return [m for m in (r.getMessage() for r in caplog.records) if "waiting for a worker" in m]

    wait_until(said_so, timeout_s=30, message="no 'waiting for a worker' line")
    line = said_so()[0]
    assert f"on queue {queue!r}" in line and "of 4 asked" in line, line
    assert "`optuna-rq workers --import tests.support.objectives --queue default`" in line, line
    workers_factory(count=1)
    run.join(timeout=60)
    assert not run.is_alive(), "the run did not finish once a worker served its queue"
    assert [t.state for t in opt.study.trials] == [TrialState.COMPLETE] * 4


def test_spawn_is_in_process_only(redis_url: str) -> None:
    opt = Optimizer("tests.support.objectives:quadratic", 1, 1, redis_url=redis_url)
    with pytest.raises(ConfigError, match="use `await optimizer"):
        asyncio.run(opt.spawn(asyncio.Semaphore(1), {}))
