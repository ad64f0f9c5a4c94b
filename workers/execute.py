"""Run one trial's objective and turn whatever it does into one `TrialResult`.

`execute` never raises for anything the objective does: a refused or unloadable objective, one
whose parameters do not take the trial's inputs, an exception (`SystemExit` and
`KeyboardInterrupt` included), a prune, RQ's timeout alarm and a return value that is not the
study's values each become a FAIL or PRUNED result with its `FailReason`; only the worker's own
cold shutdown (`WorkerShutdown`) goes through. `trial_result` is the one place a `TrialResult`
is built, here and by the supervisor for the attempts it reports lost.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import optuna
from rq.timeouts import JobTimeoutException

from optuna_rq.errors import ObjectiveLoadError, ObjectiveRefusedError
from optuna_rq.protocol import (
    TRIAL_PARAMETER,
    FailReason,
    Outcome,
    TrialRequest,
    TrialResult,
    describe_exception,
    inputs_mismatch,
    judge_return,
)
from optuna_rq.workers.loader import load_objective

__all__ = ["TrialIdentity", "WorkerShutdown", "execute", "trial_result"]


class WorkerShutdown(SystemExit):
    """The worker process's own cold shutdown (a second SIGTERM or SIGINT to it), raised by its
    signal handler wherever the process was, inside an objective too. It ends the process, never
    the trial as the objective's error: a `SystemExit` or `KeyboardInterrupt` the objective
    raises itself is its error, and the trial fails with it (`exception`)."""


class TrialIdentity(Protocol):
    """Which attempt of which trial a result is for: a `TrialRequest`, or a supervisor's
    `Attempt`."""

    @property
    def study(self) -> str: ...
    @property
    def incarnation(self) -> str: ...
    @property
    def trial_number(self) -> int: ...
    @property
    def attempt(self) -> int: ...
    @property
    def token(self) -> str: ...  # the request's: the broker accepts only a result with it


def trial_result(
    of: TrialIdentity,
    outcome: Outcome,
    *,
    worker: str,
    started: float,
    values: list[float] | None = None,
    reason: FailReason | None = None,
    error: str | None = None,
) -> TrialResult:
    """The result of attempt `of`, which started at `started` (`time.monotonic()`, one clock for
    every process on the machine) and ran on `worker`."""
    return TrialResult(
        study=of.study,
        incarnation=of.incarnation,
        trial_number=of.trial_number,
        attempt=of.attempt,
        outcome=outcome,
        values=values,
        fail_reason=reason,
        error=error,
        worker=worker,
        duration_s=max(0.0, time.monotonic() - started),
        token=of.token,
    )


def execute(
    request: TrialRequest,
    *,
    worker: str,
    served: frozenset[str],
    trial: Any | None = None,
) -> TrialResult:
    """Run one trial request to a result; never raises for anything the objective does.

    `served` is the allow-list (`loader.load_objective`); `trial` is the proxy handed to
    objectives that take a `trial` parameter.
    """
    started = time.monotonic()

    def result(
        outcome: Outcome,
        values: list[float] | None = None,
        reason: FailReason | None = None,
        error: str | None = None,
    ) -> TrialResult:
        return trial_result(
            request,
            outcome,
            worker=worker,
            started=started,
            values=values,
            reason=reason,
            error=error,
        )

    try:
        fn = load_objective(request.objective, served)
    except ObjectiveRefusedError as exc:
        return result(Outcome.FAIL, reason=FailReason.NOT_ALLOWED, error=str(exc))
    except ObjectiveLoadError as exc:
        return result(Outcome.FAIL, reason=FailReason.IMPORT_ERROR, error=describe_exception(exc))
    # Checked before the call, so that a TypeError the objective raises itself stays its own.
    mismatch = inputs_mismatch(fn, request.params)
    if mismatch is not None:
        return result(Outcome.FAIL, reason=FailReason.BAD_SIGNATURE, error=mismatch)

    try:
        returned = _call(fn, dict(request.params), trial)
    except optuna.TrialPruned:
        return result(Outcome.PRUNED)
    except JobTimeoutException as exc:  # RQ's alarm stopped Python code at the trial timeout
        return result(Outcome.FAIL, reason=FailReason.TIMEOUT, error=f"{exc}")
    except WorkerShutdown:  # the process is going: the attempt is reported lost, and retried
        raise
    except (Exception, KeyboardInterrupt, SystemExit) as exc:  # sys.exit and argparse too
        return result(Outcome.FAIL, reason=FailReason.EXCEPTION, error=describe_exception(exc))

    values, why = judge_return(returned, request.n_objectives)
    if why is not None:
        return result(Outcome.FAIL, reason=FailReason.BAD_RETURN, error=why)
    return result(Outcome.COMPLETE, values=values)


def _call(fn: Callable[..., Any], params: dict[str, Any], trial: Any | None) -> Any:
    """Call a sync or async function, or a flytekit task (run locally), with `params`, and a
    remote trial proxy when the function takes `trial` (define-by-run, or mixed)."""
    if TRIAL_PARAMETER in _parameters(fn):
        if trial is None:
            raise TypeError("this objective takes `trial`, but no remote trial is available here")
        try:
            return _run(fn, {**params, TRIAL_PARAMETER: trial})
        finally:  # its calls' replies read before its result goes (an error there is its own)
            trial.settle()
    return _run(fn, params)


def _run(fn: Callable[..., Any], params: dict[str, Any]) -> Any:
    out = fn(**params)
    if inspect.isawaitable(out):
        return asyncio.run(_awaited(out))
    return out


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _parameters(fn: Callable[..., Any]) -> Iterable[str]:
    try:
        return inspect.signature(getattr(fn, "task_function", fn)).parameters
    except (TypeError, ValueError):
        return ()
