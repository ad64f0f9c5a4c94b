"""The worker's job function in-process: what may run, and how every outcome becomes a result."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from optuna_rq.errors import ObjectiveRefusedError
from optuna_rq.protocol import FailReason, Outcome, TrialRequest
from optuna_rq.workers.execute import execute
from optuna_rq.workers.loader import load_objective

SERVED = frozenset({"tests.support.objectives"})


def request(objective: str, n_objectives: int = 1, **params: object) -> TrialRequest:
    return TrialRequest(
        study="s",
        incarnation="0123456789ab",
        trial_number=3,
        attempt=1,
        objective=objective,
        params=params or {"x": 1.5},  # type: ignore[arg-type]
        n_objectives=n_objectives,
        reply_to="r",
    )


def test_a_complete_trial_carries_its_value_and_identity() -> None:
    result = execute(
        request("tests.support.objectives:quadratic", x=3.0, depth=1), worker="w", served=SERVED
    )
    assert result.outcome is Outcome.COMPLETE
    assert result.values == [2.0]
    assert (result.study, result.trial_number, result.attempt, result.worker) == ("s", 3, 1, "w")
    assert result.fail_reason is None and result.duration_s >= 0


@pytest.mark.parametrize(
    ("objective", "n_objectives", "outcome", "reason", "text"),
    [
        (
            "tests.support.objectives:raises",
            1,
            Outcome.FAIL,
            FailReason.EXCEPTION,
            "objective refuses x=",
        ),
        (
            "tests.support.objectives:returns_str",
            1,
            Outcome.FAIL,
            FailReason.BAD_RETURN,
            "expected a float",
        ),
        (
            "tests.support.objectives:returns_nan",
            1,
            Outcome.FAIL,
            FailReason.BAD_RETURN,
            "nan is not",
        ),
        (
            "tests.support.objectives:quadratic",
            2,
            Outcome.FAIL,
            FailReason.BAD_RETURN,
            "tuple of 2 floats",
        ),
        ("tests.support.objectives:prunes", 1, Outcome.PRUNED, None, None),
        (
            "tests.support.objectives:missing",
            1,
            Outcome.FAIL,
            FailReason.IMPORT_ERROR,
            "no function",
        ),
        (
            "tests.support.objectives:_private",
            1,
            Outcome.FAIL,
            FailReason.NOT_ALLOWED,
            "not a public",
        ),
        (
            "tests.support.objectives:imported_name",
            1,
            Outcome.FAIL,
            FailReason.NOT_ALLOWED,
            "defined in",
        ),
        (
            "tests.support.objectives:os.system",
            1,
            Outcome.FAIL,
            FailReason.NOT_ALLOWED,
            "public function",
        ),
        ("os:system", 1, Outcome.FAIL, FailReason.NOT_ALLOWED, "not served here"),
        ("tests.support.objectives", 1, Outcome.FAIL, FailReason.NOT_ALLOWED, "has no ':'"),
    ],
)
def test_each_outcome_and_failure_reason(
    objective: str, n_objectives: int, outcome: Outcome, reason: FailReason | None, text: str | None
) -> None:
    result = execute(request(objective, n_objectives), worker="w", served=SERVED)
    assert result.outcome is outcome
    assert result.fail_reason is reason
    if text is not None:
        assert result.error is not None and text in result.error
    assert result.values is None


def test_async_and_multi_objective_functions() -> None:
    assert execute(
        request("tests.support.objectives:async_quadratic", x=3.0), worker="w", served=SERVED
    ).values == [4.0]
    assert execute(
        request("tests.support.objectives:pair", 2, x=2.0, y=3.0), worker="w", served=SERVED
    ).values == [4.0, 4.0]


@pytest.mark.processes
def test_refusal_happens_before_any_import(tmp_path: Path) -> None:
    """Run in a fresh interpreter so that nothing has imported the module yet."""
    mark = tmp_path / "mark"
    code = (
        "from optuna_rq.errors import ObjectiveRefusedError\n"
        "from optuna_rq.workers.loader import load_objective\n"
        "for spec in ['tests.support.mark_on_import:objective',\n"
        "             'tests.support.mark_on_import:os.system']:\n"
        "    try:\n"
        "        load_objective(spec, frozenset({'tests.support.objectives'}))\n"
        "    except ObjectiveRefusedError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit('not refused: ' + spec)\n"
        "import sys\n"
        "assert 'tests.support.mark_on_import' not in sys.modules\n"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        cwd=Path(__file__).parents[2],
        env={"OPTUNA_RQ_TEST_IMPORT_MARK": str(mark), "PATH": "/usr/bin:/bin"},
    )
    assert not mark.exists()


def test_load_objective_names_the_fix() -> None:
    with pytest.raises(ObjectiveRefusedError, match=r"--import os"):
        load_objective("os:system", SERVED)
