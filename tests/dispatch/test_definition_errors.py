"""Definition errors stop a study before it spends its budget: an objective that does not import,
that no worker may serve, or whose parameters do not take the space's inputs.

Where the objective imports on the submitting machine, `submit` refuses it (exit 2, naming the
names, nothing sent); where it imports only on the workers, the first trials that meet it fail
the study (`DEFINITION_ERRORS` says after how many). The in-process Optimizer refuses it before
any trial.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import redis

from optuna_rq import ConfigError, Optimizer, suggest
from optuna_rq.dispatch.runs import DEFINITION_ERRORS
from optuna_rq.protocol import FailReason, Keys, inputs_mismatch

pytestmark = pytest.mark.timeout(180)

X = "x={type: float, low: -10, high: 10}"
WORKERS_ONLY = Path(__file__).resolve().parents[1] / "support" / "workers_only"


def status_of(run_cli, name: str) -> dict:
    result = run_cli("status", name, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# -- the rule, in-process: every shape of signature -------------------------------------------


def _xy(x: float, y: float) -> float:
    return x + y


class _Callable:
    def __call__(self, x: float) -> float:
        return x


async def _async_x(x: float) -> float:
    return x


def _positional_only(x: float, /) -> float:
    return x


def _keyword_only(*, x: float, y: float = 1.0) -> float:
    return x + y


def _star_args(*args: float, x: float) -> float:
    return x


def _with_kwargs(x: float, **rest: Any) -> float:
    return x


def _define_by_run(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0, 1)


def _mixed(trial: optuna.Trial, depth: int) -> float:
    return float(depth)


def _defaults(x: float, depth: int = 0, seed: int = 42) -> float:
    return x


BINDS: list[tuple[Callable[..., Any], set[str]]] = [
    (_xy, {"x", "y"}),
    (_defaults, {"x"}),  # defaults need not be given
    (_defaults, {"x", "depth", "seed"}),
    (_keyword_only, {"x"}),
    (_star_args, {"x"}),
    (_with_kwargs, {"x", "booster", "seed"}),  # **kwargs takes any name
    (_define_by_run, set()),  # `trial` is given by the trial, not the space
    (_mixed, {"depth"}),
    (_Callable(), {"x"}),
    (_async_x, {"x"}),
    (functools.partial(_xy, y=1.0), {"x"}),
    (max, {"anything"}),  # no signature to read: the call itself says
]

REFUSED: list[tuple[Callable[..., Any], set[str], list[str]]] = [
    (_xy, {"x"}, ["requires 'y'"]),
    (_xy, {"x", "y", "booster", "seed"}, ["gives 'booster', 'seed'", "does not take"]),
    (_xy, {"x", "z"}, ["requires 'y'", "gives 'z'"]),
    (_defaults, {"x", "lr"}, ["gives 'lr'"]),
    (_keyword_only, {"y"}, ["requires 'x'"]),
    (_positional_only, {"x"}, ["'x'"]),  # it cannot be given by name
    (_define_by_run, {"x"}, ["gives 'x'"]),
    (_mixed, set(), ["requires 'depth'"]),
    (_Callable(), {"y"}, ["requires 'x'", "gives 'y'"]),
    (_async_x, set(), ["requires 'x'"]),
]


@pytest.mark.parametrize(("objective", "inputs"), BINDS)
def test_an_objective_that_takes_the_inputs_passes(
    objective: Callable[..., Any], inputs: set[str]
) -> None:
    assert inputs_mismatch(objective, inputs) is None


@pytest.mark.parametrize(("objective", "inputs", "said"), REFUSED)
def test_an_objective_that_does_not_take_the_inputs_is_refused_naming_the_names(
    objective: Callable[..., Any], inputs: set[str], said: list[str]
) -> None:
    why = inputs_mismatch(objective, inputs)
    assert why is not None and "cannot take the space's inputs" in why
    assert all(part in why for part in said), why


def test_the_in_process_optimizer_refuses_it_before_any_trial() -> None:
    def objective(trial: optuna.Trial, x: float) -> float:
        return x

    optimizer = Optimizer(objective, concurrency=2, n_trials=5)
    with pytest.raises(ConfigError, match="gives 'booster'"):
        optimizer.run(x=suggest.float(0, 1), booster="dart")
    assert optimizer.study is not None and optimizer.study.trials == []
    optimizer.run(x=suggest.float(0, 1))  # the same Optimizer, with the inputs it takes
    assert len(optimizer.study.trials) == 5


# -- at submit, where the objective imports: refused, nothing sent -----------------------------


@pytest.mark.parametrize(
    ("objective", "params", "said"),
    [
        (
            "tests.support.objectives:quadratic",
            [X, "booster=dart", "seed=1"],
            ["'booster', 'seed'"],
        ),
        (
            "tests.support.objectives:quadratic",
            ["y={type: float, low: 0, high: 1}"],
            ["'x'", "'y'"],
        ),
        ("tests.support.objectives:nested", ["seed=42"], ["requires 'model'"]),
        ("tests.support.objectives:define_by_run", [X], ["gives 'x'"]),
        ("tests.support.objectives:nope", [X], ["has no function 'nope'"]),
    ],
)
def test_submit_refuses_an_objective_that_cannot_run_where_it_imports(
    run_cli, conn: redis.Redis, prefix: str, objective: str, params: list[str], said: list[str]
) -> None:
    args = [a for p in params for a in ("--param", p)]
    result = run_cli(
        "submit", objective, *args, "--n-trials", "5", "--concurrency", "1", "--study-name", "s"
    )
    assert result.returncode == 2, result.stderr
    assert all(part in result.stderr for part in said), result.stderr
    assert result.stdout == ""  # no study name: nothing was submitted
    assert conn.llen(Keys(prefix).commands) == 0


def test_submit_sends_an_objective_that_does_not_import_here(
    run_cli, conn: redis.Redis, prefix: str
) -> None:
    """A laptop submitting to a cluster: the module is not here, so the workers check it."""
    result = run_cli(
        "submit", "elsewhere:takes_x", "--param", X, "--n-trials", "1", "--concurrency", "1"
    )
    assert result.returncode == 0, result.stderr
    assert conn.llen(Keys(prefix).commands) == 1


# -- on the workers, where only they import it: the study fails early ---------------------------

ON_WORKERS = [
    # (objective, --param values, its fail reason, what the error names)
    ("elsewhere:nope", [X], FailReason.IMPORT_ERROR, "has no function 'nope'"),
    ("elsewhere:takes_x", [X, "booster=dart"], FailReason.BAD_SIGNATURE, "gives 'booster'"),
    ("elsewhere:takes_x", ["y={type: float, low: 0, high: 1}"], FailReason.BAD_SIGNATURE, "'x'"),
]


def test_every_definition_error_a_study_can_meet_is_tested_on_workers() -> None:
    """`not_allowed` cannot reach a worker through a submission (a trial only goes to workers
    serving its module: tests/processes/test_routing.py); a planted one is
    tests/workers/test_security.py's."""
    tested = {reason for _, _, reason, _ in ON_WORKERS}
    assert tested == set(DEFINITION_ERRORS) - {FailReason.NOT_ALLOWED}


@pytest.mark.parametrize(("objective", "params", "reason", "said"), ON_WORKERS)
def test_a_definition_error_met_on_the_workers_fails_the_study_early(
    run_cli,
    broker_process,
    workers_factory,
    objective: str,
    params: list[str],
    reason: FailReason,
    said: str,
) -> None:
    workers_factory(count=1, modules=("elsewhere",), args=("--path", str(WORKERS_ONLY)))
    args = [a for p in params for a in ("--param", p)]
    name = "broken"
    waited = run_cli(
        "submit", objective, *args, "--n-trials", "50", "--concurrency", "2",
        "--study-name", name, "--wait",
    )  # fmt: skip
    assert waited.returncode == 1, waited.stderr
    assert reason.value in waited.stderr and said in waited.stderr, waited.stderr
    snapshot = status_of(run_cli, name)
    assert snapshot["state"] == "failed" and reason.value in snapshot["error"]
    assert said in snapshot["error"]
    # It stops after as many in a row as its reason allows; the one beside (concurrency 2) may
    # have ended as well, by the same reason or cancelled.
    stops_after = DEFINITION_ERRORS[reason]
    assert stops_after <= snapshot["fail_reasons"][reason.value] <= stops_after + 1, snapshot
    assert snapshot["ended"] <= stops_after + 1, snapshot
    # The workers serve on: the same module, with an objective and inputs that agree.
    run_cli(
        "submit", "elsewhere:takes_x", "--param", X, "--n-trials", "2", "--concurrency", "1",
        "--study-name", "after",
    )  # fmt: skip
    assert run_cli("wait", "after", "--timeout", "60").returncode == 0
    assert status_of(run_cli, "after")["complete"] == 2
