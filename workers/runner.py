"""The one RQ job function a worker runs: decode a trial, run its objective, report the result.

What may run is decided here, before anything is imported: the objective's exact
`module:function` must name a module this worker was started to serve (`serve()`), and a public
function defined in that module. Everything the objective does, raises or returns becomes one
`TrialResult` appended to the broker's result stream.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import optuna
import redis
from rq.timeouts import JobTimeoutException

from optuna_rq.errors import (
    ConfigError,
    ObjectiveLoadError,
    ObjectiveRefusedError,
    ProtocolError,
)
from optuna_rq.protocol import (
    DEFAULT_LEASE_TTL_S,
    FailReason,
    Keys,
    Outcome,
    Signer,
    TrialRequest,
    TrialResult,
    describe_exception,
    judge_return,
    parse_objective_path,
)
from optuna_rq.workers.remote_trial import RemoteTrial
from optuna_rq.workers.supervision import (
    Attempt,
    ChildChannel,
    LeaseThread,
    deliver,
)

__all__ = [
    "execute",
    "load_objective",
    "run_trial",
    "serve",
    "served_modules",
]


log = logging.getLogger("optuna_rq.worker")

_served: frozenset[str] = frozenset()
_signer = Signer()
_channel: ChildChannel | None = None
_lease_ttl_s = DEFAULT_LEASE_TTL_S


class _WorkerMetrics:
    def __init__(self, port: int) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

        registry = CollectorRegistry()
        self.trials = Counter(
            "optuna_rq_worker_trials",
            "Trials this worker ran, by outcome and failure reason.",
            ["outcome", "reason"],
            registry=registry,
        )
        self.seconds = Histogram(
            "optuna_rq_worker_trial_seconds",
            "How long objectives ran.",
            buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 5, 30, 60, 300, 1800, 3600),
            registry=registry,
        )
        start_http_server(port, registry=registry)

    def observe(self, result: TrialResult) -> None:
        reason = result.fail_reason.value if result.fail_reason else ""
        self.trials.labels(outcome=result.outcome.value, reason=reason).inc()
        self.seconds.observe(result.duration_s)


_metrics: _WorkerMetrics | None = None


def serve_metrics(port: int) -> None:
    """Count trials and their durations, served for Prometheus on `port`."""
    global _metrics
    _metrics = _WorkerMetrics(port)


def use_signer(signer: Signer) -> None:
    """Sign results and require signed requests from now on (with a secret; else a no-op)."""
    global _signer
    _signer = signer


def use_supervisor(channel: ChildChannel | None, lease_ttl_s: float) -> None:
    """Leases last `lease_ttl_s`; with a `channel`, the supervising parent renews them (else a
    thread in this process does)."""
    global _channel, _lease_ttl_s
    _channel = channel
    _lease_ttl_s = lease_ttl_s


def horse_exited(pid: int, exitcode: int) -> None:
    """Tell the supervising parent how a forked work horse ended, if it ended abnormally."""
    if _channel is not None:
        _channel.exited(pid, exitcode)


def serve(modules: Iterable[str]) -> None:
    """Import `modules` now and allow objectives from them (and only them) from here on.

    Raises ObjectiveLoadError naming the module, with the real ImportError chained, so a worker
    that cannot serve what it was asked to stops at once rather than failing every trial.
    """
    global _served
    names = list(modules)
    for name in names:
        try:
            parse_objective_path(f"{name}:f")
        except ConfigError as exc:
            raise ObjectiveLoadError(f"--import {name!r} is not a dotted module name") from exc
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise ObjectiveLoadError(
                f"cannot import {name!r}: {type(exc).__name__}: {exc} "
                "(is it on PYTHONPATH, and does it import cleanly?)"
            ) from exc
    _served = frozenset(names)


def served_modules() -> frozenset[str]:
    return _served


def load_objective(spec: str, served: frozenset[str]) -> Callable[..., Any]:
    """The function `spec` names, if `served` allows it; the check runs before any import."""
    try:
        module_name, function_name = parse_objective_path(spec)
    except ConfigError as exc:
        raise ObjectiveRefusedError(str(exc)) from exc
    if module_name not in served:
        raise ObjectiveRefusedError(
            f"objective {spec!r} is not served here: this worker serves "
            f"{sorted(served) or 'no modules'} (start it with --import {module_name})"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ObjectiveLoadError(f"cannot import {module_name!r}: {exc}") from exc
    fn = getattr(module, function_name, None)
    if fn is None:
        raise ObjectiveLoadError(f"module {module_name!r} has no function {function_name!r}")
    defined_in = getattr(getattr(fn, "task_function", fn), "__module__", None)
    if defined_in != module_name or not callable(fn):
        raise ObjectiveRefusedError(
            f"{spec!r} is not a function defined in {module_name!r} "
            f"(it comes from {defined_in!r}): only objectives defined in a served module run"
        )
    return fn  # type: ignore[no-any-return]


def _call(fn: Callable[..., Any], params: dict[str, Any], trial: Any | None) -> Any:
    """Call a sync or async function, or a flytekit task (run locally), with `params`, and a
    remote trial proxy when the function takes `trial` (define-by-run, or mixed)."""
    if "trial" in _parameters(fn):
        if trial is None:
            raise TypeError("this objective takes `trial`, but no remote trial is available here")
        params = {**params, "trial": trial}
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


def execute(
    request: TrialRequest,
    *,
    worker: str,
    served: frozenset[str],
    trial: Any | None = None,
) -> TrialResult:
    """Run one trial request to a result; never raises for anything the objective does.

    `trial` is the proxy handed to objectives that take a `trial` parameter.
    """
    started = time.monotonic()

    def result(
        outcome: Outcome,
        values: list[float] | None = None,
        reason: FailReason | None = None,
        error: str | None = None,
    ) -> TrialResult:
        return TrialResult(
            study=request.study,
            trial_number=request.trial_number,
            attempt=request.attempt,
            outcome=outcome,
            values=values,
            fail_reason=reason,
            error=error,
            worker=worker,
            duration_s=time.monotonic() - started,
        )

    try:
        fn = load_objective(request.objective, served)
    except ObjectiveRefusedError as exc:
        return result(Outcome.FAIL, reason=FailReason.NOT_ALLOWED, error=str(exc))
    except ObjectiveLoadError as exc:
        return result(Outcome.FAIL, reason=FailReason.IMPORT_ERROR, error=describe_exception(exc))

    try:
        returned = _call(fn, dict(request.params), trial)
    except optuna.TrialPruned:
        return result(Outcome.PRUNED)
    except JobTimeoutException as exc:  # RQ's alarm stopped Python code at the trial timeout
        return result(Outcome.FAIL, reason=FailReason.TIMEOUT, error=f"{exc}")
    except Exception as exc:
        return result(Outcome.FAIL, reason=FailReason.EXCEPTION, error=describe_exception(exc))

    values, why = judge_return(returned, request.n_objectives)
    if why is not None:
        return result(Outcome.FAIL, reason=FailReason.BAD_RETURN, error=why)
    return result(Outcome.COMPLETE, values=values)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _describe(result: TrialResult) -> str:
    head = (
        f"study {result.study!r} trial {result.trial_number} "
        f"(attempt {result.attempt}): {result.outcome.value}"
    )
    if result.values is not None:
        shown = ", ".join(f"{v:.6g}" for v in result.values)
        head += f" value{'s' if len(result.values) > 1 else ''}={shown}"
    if result.fail_reason is not None:
        first_line = (result.error or "").strip().splitlines()[-1:] or [""]
        head += f" [{result.fail_reason.value}] {first_line[0]}"
    return f"{head} in {result.duration_s:.3f}s"


def run_trial(payload: bytes) -> None:
    """RQ job function: run the encoded `TrialRequest` and append its result to `reply_to`.

    The attempt's lease is taken before the objective starts and dropped once the result is in
    the stream. A payload that does not decode raises `ProtocolError`: RQ records the job as
    failed and no result is sent, since nothing in an invalid message can be trusted; the broker
    finds the job failed without a lease and fails the attempt.
    """
    from rq import get_current_job

    job = get_current_job()
    if job is None:
        raise RuntimeError("run_trial must run inside an RQ worker")
    connection: redis.Redis = job.connection
    try:
        body = _signer.open(payload, what="TrialRequest")
        request = TrialRequest.decode(body, max_bytes=_signer.max_message_bytes)
    except ProtocolError:
        # A queue is named for its prefix.
        connection.hincrby(Keys(job.origin).refused, "request", 1)
        raise
    holder = worker_id()
    timeout_s = float(job.timeout) if job.timeout is not None and job.timeout > 0 else None
    attempt = Attempt.of(
        request,
        job_id=job.id,
        lease=Keys.lease(request.reply_to, job.id),
        holder=holder,
        timeout_s=timeout_s,
    )
    with _leased(connection, attempt):
        trial = RemoteTrial(connection, request, _signer)
        outcome = execute(request, worker=holder, served=_served, trial=trial)
        deliver(connection, request.reply_to, _signer.seal(outcome.encode()), attempt.lease)
    if _metrics is not None:
        _metrics.observe(outcome)
    log.info("%s", _describe(outcome))


@contextmanager
def _leased(connection: redis.Redis, attempt: Attempt) -> Iterator[None]:
    """Hold the attempt's lease while the body runs: renewed by the supervising parent, or by a
    thread here when this process has none."""
    connection.set(attempt.lease, attempt.holder, px=int(_lease_ttl_s * 1000))
    if _channel is None:
        with LeaseThread(connection, attempt, _lease_ttl_s):
            yield
        return
    _channel.started(attempt)
    try:
        yield
    finally:
        _channel.ended(attempt)
