"""The one RQ job function a worker runs: decode a trial, run its objective, report the result.

Its dotted path is on the wire (`optuna_rq.protocol.RUN_TRIAL`): the broker enqueues it by name,
and workers refuse every other. What the process serves, its signer, its supervisor and its
metrics come from the installed `WorkerContext` (`workers.context`); what may run is decided by
the allow-list (`workers.loader`) before anything is imported, and everything the objective does,
raises or returns becomes one `TrialResult` (`workers.execute`) appended to the broker's stream.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis

from optuna_rq.errors import ProtocolError
from optuna_rq.plumbing.outages import UNREACHABLE, outage_of
from optuna_rq.plumbing.redis_waits import is_full, wait_for_memory, wait_for_redis
from optuna_rq.protocol import (
    FailReason,
    Keys,
    Outcome,
    Record,
    TrialRequest,
    TrialResult,
    error_headline,
)
from optuna_rq.protocol.counters import count_refused
from optuna_rq.workers.cancel_marks import CancelMarks
from optuna_rq.workers.context import WorkerContext, current
from optuna_rq.workers.delivery import deliver
from optuna_rq.workers.execute import execute, trial_result
from optuna_rq.workers.remote_trial import RemoteTrial
from optuna_rq.workers.running_attempt import Attempt
from optuna_rq.workers.supervision import LeaseThread

__all__ = ["refuse_trial", "run_trial", "worker_id"]


log = logging.getLogger("optuna_rq.worker")


def worker_id() -> str:
    """This process as a lease holder and a result's `worker`: `host:pid`."""
    return f"{socket.gethostname()}:{os.getpid()}"


def run_trial(*payloads: bytes) -> None:
    """RQ job function: run each encoded `TrialRequest` in turn, and append each one's result
    to its `reply_to` as it ends. A job carries one trial, or several of one study (its
    `batch`): its id names every attempt it carries (`Keys.batch_job_id`).

    Each attempt's lease is taken before its objective starts and dropped once its result is in
    the stream; a result that Redis cannot take (unreachable, or full) is held, its lease kept,
    until it can (`workers.delivery`). A payload that does not decode raises `ProtocolError`
    before any trial starts: RQ records the job as failed and no result is sent, since nothing
    in an invalid message can be trusted; the broker finds the job failed without a lease and
    fails its attempts.
    """
    from rq import get_current_job

    job = get_current_job()
    if job is None:
        raise RuntimeError("run_trial must run inside an RQ worker")
    ctx = current()
    connection: redis.Redis = job.connection
    keys = Keys(Keys.prefix_of(job.origin))  # a trial queue's name starts with its prefix
    try:
        if not payloads:
            raise ProtocolError(f"job {job.id!r} carries no trial: refused")
        requests = _opened(payloads, ctx)
        try:
            carried = Keys.batch_job_id([request.attempt_id for request in requests])
        except ValueError as exc:
            raise ProtocolError(f"job {job.id!r}: {exc}: refused") from None
        if job.id != carried:
            # Signed requests name their attempts, and so the job that carries them: under
            # another id they are a copy (a Redis writer re-enqueueing a job it read), and
            # would run twice.
            raise ProtocolError(
                f"job {job.id!r} carries the requests of job {carried!r} "
                "(a copy of another job?): refused"
            )
    except ProtocolError:
        count_refused(connection, keys, "request")
        raise
    # A trial's timeout is its job's: a study that batches has none (`StudySpec.batch`).
    timeout_s = float(job.timeout) if job.timeout is not None and job.timeout > 0 else None
    for request in requests:
        # A worker told to stop runs what is left of its job all the same (RQ's warm shutdown
        # waits for the job): a trial not started would be counted lost, and retried.
        _run_one(connection, job.id, request, ctx, keys, timeout_s)


def _run_one(
    connection: redis.Redis,
    job_id: str,
    request: TrialRequest,
    ctx: WorkerContext,
    keys: Keys,
    timeout_s: float | None,
) -> None:
    """Run one trial of a job: lease it, run its objective, deliver its result."""
    holder = worker_id()
    attempt = Attempt.of(
        request,
        job_id=job_id,
        lease=Keys.lease(request.attempt_id),  # named from the signed request, not the job
        holder=holder,
        timeout_s=timeout_s,
    )
    cancelled = _take_lease(connection, attempt, ctx, keys)
    if cancelled is None:
        log.error(
            "%s: NOT started: Redis is unreachable and this worker is stopping; the broker runs "
            "the trial again once it finds no lease",
            attempt.describe(),
        )
        return
    with _leased(connection, attempt, ctx):
        if cancelled:  # the broker cancelled it while it was queued: it does not start
            outcome = attempt.failed(FailReason.CANCELLED, "the study was cancelled")
        else:
            log.info("%s: started in pid %d", attempt.describe(), attempt.pid)
            trial = RemoteTrial(connection, request, ctx.signer, keys=keys)
            outcome = execute(request, worker=holder, served=ctx.served, trial=trial)
        delivered = deliver(
            connection,
            request.reply_to,
            ctx.signer.seal(Record.RESULT, outcome.encode()),
            attempt.lease,
            lease_ttl_s=ctx.lease_ttl_s,  # renewed meanwhile by its renewer too: belt and braces
            what=attempt.describe(),
            stop=ctx.stopping,
        )
    if ctx.metrics is not None:
        ctx.metrics.observe(outcome)
    if not delivered:
        log.error(
            "%s, NOT delivered: Redis is unreachable and this worker is stopping; the broker runs "
            "the trial again once its lease lapses",
            _describe(outcome),
        )
        return
    log.info("%s", _describe(outcome))


def refuse_trial(job: Any, why: str) -> None:
    """Fail, without running it, the trial of an RQ job this worker cannot run as given (its
    timeout beyond what RQ and the OS take, say): its study learns `why` as a FAIL result, not
    as a lost worker. A payload that does not open is only counted, as `run_trial` does."""
    ctx = current()
    connection: redis.Redis = job.connection
    try:
        requests = _opened(job.args, ctx)
    except (ProtocolError, TypeError, ValueError):
        count_refused(connection, Keys(Keys.prefix_of(job.origin)), "request")
        return
    for request in requests:
        result = trial_result(
            request,
            Outcome.FAIL,
            worker=worker_id(),
            started=time.monotonic(),
            reason=FailReason.EXCEPTION,
            error=f"not run: {why}",
        )
        what = f"study {request.study!r} trial {request.trial_number} (attempt {request.attempt})"
        delivered = deliver(
            connection,
            request.reply_to,
            ctx.signer.seal(Record.RESULT, result.encode()),
            None,
            what=what,
            stop=ctx.stopping,
        )
        log.error(
            "%s%s", _describe(result), "" if delivered else ", NOT delivered (Redis unreachable)"
        )


def _opened(payloads: Sequence[bytes], ctx: WorkerContext) -> list[TrialRequest]:
    """The requests a job carries, each opened and decoded; ProtocolError for any that is not
    one (unsigned, or not sealed by the broker, with signing on)."""
    return [
        TrialRequest.decode(
            ctx.signer.open(Record.REQUEST, payload), max_bytes=ctx.signer.max_message_bytes
        )
        for payload in payloads
    ]


def _take_lease(
    connection: redis.Redis, attempt: Attempt, ctx: WorkerContext, keys: Keys
) -> bool | None:
    """Take the attempt's lease and read its cancel mark in one transaction: whether the broker
    cancelled the attempt before it started, or None if this worker stops while Redis is away.
    A full Redis or an outage is waited out: the trial waits to start, it does not fail (and RQ
    is left nothing to log)."""
    told = False
    while True:
        pipe = connection.pipeline(transaction=True)
        pipe.set(attempt.lease, attempt.holder, px=int(ctx.lease_ttl_s * 1000))
        pipe.get(attempt.cancel_mark)
        try:
            taken, mark = pipe.execute(raise_on_error=False)  # a mark not a string: refused
            if isinstance(taken, Exception):
                raise taken
            outage_of(connection).recovered()
            return CancelMarks(connection, ctx.signer, keys).holds(attempt, mark)
        except UNREACHABLE as exc:
            waited = wait_for_redis(
                connection, exc, max_backoff_s=ctx.lease_ttl_s / 4, stop=ctx.stopping
            )
            if waited is None:
                return None
        except redis.ResponseError as exc:
            if not is_full(exc):
                raise
            wait_for_memory(
                connection, exc, what=f"{attempt.describe()} waits to start", quiet=told
            )
            told = True


@contextmanager
def _leased(connection: redis.Redis, attempt: Attempt, ctx: WorkerContext) -> Iterator[None]:
    """Hold the attempt's lease (taken by `_take_lease`) while the body runs: renewed by the
    supervising parent (which also stops it if the broker cancels it), or by a thread here when
    this process has none."""
    if ctx.channel is None:
        with LeaseThread(connection, attempt, ctx.lease_ttl_s):
            yield
        return
    ctx.channel.started(attempt)
    try:
        yield
    finally:
        ctx.channel.ended(attempt)


def _describe(result: TrialResult) -> str:
    """The line a trial's end gets (its start got one too, from `run_trial`)."""
    head = (
        f"study {result.study!r} trial {result.trial_number} "
        f"(attempt {result.attempt}): {result.outcome.value}"
    )
    if result.values is not None:
        shown = ", ".join(f"{v:.6g}" for v in result.values)
        head += f" value{'s' if len(result.values) > 1 else ''}={shown}"
    if result.fail_reason is not None:
        head += f" [{result.fail_reason.value}] {error_headline(result.error)}"
    return f"{head} in {result.duration_s:.3f}s"
