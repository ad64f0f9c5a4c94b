"""The dispatch loop: ask -> process -> enqueue; results -> tell -> acknowledge -> refill.

The cap is exact: a study never has more than `concurrency` trials asked and not yet told. A
result is told at most once (stale or repeated results are acknowledged, counted and dropped),
and only then is its slot refilled.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

import optuna
import redis
from optuna.trial import TrialState

from broker.errors import ConfigError, ProtocolError
from broker.objectives import parse_objective_path
from broker.protocol import (
    FailReason,
    Outcome,
    TrialCall,
    TrialCallReply,
    TrialRequest,
    TrialResult,
    check_params,
    reply_key,
)
from broker.signing import Signer
from broker.space import Suggestion, process
from broker.verdict import Verdict, tell
from workers.pool import trial_queue
from workers.remote_trial import CALL_FIELD
from workers.runner import RESULT_FIELD, RUN_TRIAL

__all__ = ["Dispatcher", "StudyRun", "job_id"]

log = logging.getLogger("optuna_rq.dispatch")

GROUP = "broker"
"""The consumer group the broker reads results with."""


class DispatchObserver:
    """Hooks the dispatcher calls as trials move; the base does nothing (metrics override it)."""

    def asked(self, study: str, ask_s: float) -> None:
        pass

    def told(
        self,
        study: str,
        state: str,
        reason: str | None,
        *,
        tell_s: float,
        start_delay_s: float | None,
        result_age_s: float | None,
    ) -> None:
        pass

    def dropped(self) -> None:
        pass

    def refused(self, kind: str) -> None:
        pass


def job_id(prefix: str, study: str, trial_number: int, attempt: int) -> str:
    """The RQ job id of one attempt: the same inputs give the same id, so re-enqueueing is a no-op.

    RQ allows only letters, digits, '-' and '_' in ids, so the prefix and study name are hashed.
    """
    digest = hashlib.blake2b(f"{prefix}\0{study}".encode(), digest_size=8).hexdigest()
    return f"orq-{digest}-{trial_number}-{attempt}"


def _fixed_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """`inputs` with every suggestion replaced by None: what must survive msgpack as given."""
    return {
        key: (
            None
            if isinstance(value, Suggestion)
            else _fixed_inputs(value)
            if isinstance(value, dict)
            else value
        )
        for key, value in inputs.items()
    }


@dataclass(kw_only=True)
class StudyRun:
    """One study being run on workers, and the trials it has out."""

    study: optuna.Study
    objective: str
    inputs: dict[str, Any]
    concurrency: int
    n_trials: int
    trial_timeout_s: float | None = None
    slots: int | None = None  # the fair share the daemon grants; None: the cap alone
    outstanding: dict[int, int] = field(default_factory=dict)  # trial number -> attempt
    trials: dict[int, optuna.Trial] = field(default_factory=dict, repr=False)  # outstanding ones
    enqueued_at: dict[int, float] = field(default_factory=dict, repr=False)  # epoch seconds
    asked: int = 0
    told: int = 0
    peak_outstanding: int = 0

    def __post_init__(self) -> None:
        parse_objective_path(self.objective)
        try:
            check_params(_fixed_inputs(self.inputs))
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from exc

    @property
    def name(self) -> str:
        return self.study.study_name

    @property
    def done(self) -> bool:
        return self.asked >= self.n_trials and not self.outstanding

    @property
    def limit(self) -> int:
        """How many trials may be outstanding now: the cap, or less under fair share."""
        return self.concurrency if self.slots is None else min(self.concurrency, self.slots)

    @property
    def demand(self) -> int:
        """Slots this study could use now: its cap, or fewer near the end of its budget."""
        return min(self.concurrency, self.n_trials - self.asked + len(self.outstanding))

    def reattach(self) -> None:
        """Take over a study that already has trials: finished ones count against the budget,
        RUNNING ones are outstanding (their results may still arrive, or already have)."""
        trials = self.study.get_trials(deepcopy=False)
        self.asked = len(trials)
        running = [t for t in trials if t.state is TrialState.RUNNING]
        self.outstanding = {t.number: 1 for t in running}
        self.trials = {t.number: optuna.Trial(self.study, t._trial_id) for t in running}


class Dispatcher:
    """Runs studies on RQ workers through one queue and one result stream.

    Not thread-safe: one thread drives it (`run_until_done`, or `refill` and `poll`).
    """

    def __init__(
        self,
        connection: redis.Redis,
        *,
        prefix: str,
        queue: str,
        reply_to: str,
        consumer: str | None = None,
        signer: Signer | None = None,
        observer: DispatchObserver | None = None,
    ) -> None:
        self.connection = connection
        self.signer = signer or Signer()
        self.observer = observer or DispatchObserver()
        self.prefix = prefix
        self.reply_to = reply_to
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self.queue = trial_queue(connection, queue)
        self.runs: dict[str, StudyRun] = {}
        self.dropped_results = 0  # stale or repeated: acknowledged, counted, never told
        self.refused_results = 0  # not a valid (or validly signed) message
        self._group_ready = False
        self._read_pending = True  # first read this consumer's unacknowledged results

    def add(self, run: StudyRun) -> None:
        if run.name in self.runs:
            raise ConfigError(f"study {run.name!r} is already being dispatched")
        self.runs[run.name] = run
        self._ensure_group()

    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            self.connection.xgroup_create(self.reply_to, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    # -- ask -> process -> enqueue -------------------------------------------------------------

    def refill(self) -> int:
        """Launch trials until every study is at its cap or has asked its budget."""
        launched = 0
        for run in self.runs.values():
            while len(run.outstanding) < run.limit and run.asked < run.n_trials:
                self._launch(run)
                launched += 1
        return launched

    def _launch(self, run: StudyRun) -> None:
        started = time.perf_counter()
        trial = run.study.ask()
        self.observer.asked(run.name, time.perf_counter() - started)
        run.asked += 1
        run.outstanding[trial.number] = 1
        run.trials[trial.number] = trial
        run.peak_outstanding = max(run.peak_outstanding, len(run.outstanding))
        try:
            params = dict(process(trial, deepcopy(run.inputs)))
            request = TrialRequest(
                study=run.name,
                trial_number=trial.number,
                attempt=1,
                objective=run.objective,
                params=params,
                n_objectives=len(run.study.directions),
                reply_to=self.reply_to,
            )
            payload = self.signer.seal(request.encode())
        except Exception as exc:  # a space Optuna rejects: the trial fails, never RUNNING
            log.error("study %r trial %d could not be sampled: %s", run.name, trial.number, exc)
            self._finish(
                run,
                trial.number,
                Verdict(state=TrialState.FAIL, fail_reason="exception", error=str(exc)),
            )
            return
        self.queue.enqueue_call(
            func=RUN_TRIAL,
            args=(payload,),
            job_id=job_id(self.prefix, run.name, trial.number, 1),
            timeout=int(run.trial_timeout_s) if run.trial_timeout_s else -1,
            result_ttl=0,
            failure_ttl=24 * 3600,
            description=f"{run.name} trial {trial.number}",
        )
        run.enqueued_at[trial.number] = time.time()

    # -- results -> tell -> acknowledge --------------------------------------------------------

    def poll(self, block_s: float = 1.0) -> int:
        """Read the results that arrived (waiting up to `block_s`), tell them; return how many."""
        self._ensure_group()
        response: Any = None
        if self._read_pending:
            # Results delivered to a broker that died before acknowledging them: tell them now.
            response = self.connection.xreadgroup(
                GROUP, self.consumer, {self.reply_to: "0"}, count=256
            )
            if not response or not response[0][1]:
                self._read_pending = False
                response = None
        if response is None:
            response = self.connection.xreadgroup(
                GROUP,
                self.consumer,
                {self.reply_to: ">"},
                count=256,
                block=max(1, int(block_s * 1000)),
            )
        if not response:
            return 0
        handled = 0
        entry_ids: list[bytes] = []
        for _stream, entries in response:
            for entry_id, fields in entries:
                entry_ids.append(entry_id)
                if CALL_FIELD in fields:
                    self._serve_call(fields[CALL_FIELD])
                else:
                    handled += self._handle(fields.get(RESULT_FIELD, b""), entry_id)
        # Acknowledge only after telling: a broker that dies in between reads them again, and
        # telling is idempotent.
        pipe = self.connection.pipeline(transaction=False)
        pipe.xack(self.reply_to, GROUP, *entry_ids)
        pipe.xdel(self.reply_to, *entry_ids)
        pipe.execute()
        return handled

    def _handle(self, raw: bytes, entry_id: bytes = b"0-0") -> int:
        try:
            body = self.signer.open(raw, what="TrialResult")
            result = TrialResult.decode(body, max_bytes=self.signer.max_message_bytes)
        except ProtocolError as exc:
            log.error("refused a result: %s", exc)
            self.refused_results += 1
            self.observer.refused("result")
            count_refusal(self.connection, self.prefix, "result")
            return 0
        run = self.runs.get(result.study)
        if run is None or run.outstanding.get(result.trial_number) != result.attempt:
            log.warning(
                "dropped a stale result: study %r trial %d attempt %d",
                result.study,
                result.trial_number,
                result.attempt,
            )
            self.dropped_results += 1
            self.observer.dropped()
            return 0
        arrived = int(entry_id.split(b"-")[0]) / 1000  # stream ids carry the XADD time in ms
        enqueued = run.enqueued_at.get(result.trial_number)
        verdict = _verdict(result)
        started = time.perf_counter()
        self._finish(run, result.trial_number, verdict)
        self.observer.told(
            run.name,
            verdict.state.name,
            verdict.fail_reason,
            tell_s=time.perf_counter() - started,
            start_delay_s=None if enqueued is None else arrived - result.duration_s - enqueued,
            result_age_s=time.time() - arrived if arrived else None,
        )
        return 1

    def _serve_call(self, raw: bytes) -> None:
        """Run a remote trial's call on the real trial; answer it if the worker waits."""
        try:
            body = self.signer.open(raw, what="TrialCall")
            call = TrialCall.decode(body, max_bytes=self.signer.max_message_bytes)
        except ProtocolError as exc:
            log.error("refused a trial call: %s", exc)
            self.observer.refused("call")
            count_refusal(self.connection, self.prefix, "call")
            return
        run = self.runs.get(call.study)
        owned = run is not None and run.outstanding.get(call.trial_number) == call.attempt
        try:
            if run is None or not owned:
                raise LookupError(
                    f"trial {call.trial_number} (attempt {call.attempt}) of study {call.study!r} "
                    "is not running on this broker: it ended, or another broker owns it"
                )
            value = _perform(run.study, run.trials[call.trial_number], call)
            encoded = TrialCallReply(seq=call.seq, ok=True, value=value, error=None).encode()
        except Exception as exc:  # the objective gets the error; the broker serves on
            answer = TrialCallReply(seq=call.seq, ok=False, value=None, error=f"{exc}")
            encoded = answer.encode()
            if not call.reply:
                log.warning("trial call %s failed: %s", call.method, exc)
        if call.reply:
            key = reply_key(self.reply_to, call.trial_number, call.attempt)
            pipe = self.connection.pipeline(transaction=False)
            pipe.rpush(key, self.signer.seal(encoded))
            pipe.expire(key, 300)
            pipe.execute()

    def _finish(self, run: StudyRun, number: int, verdict: Verdict) -> None:
        tell(run.study, number, verdict)
        del run.outstanding[number]  # its reply list, if any, expires by itself (no extra command)
        run.trials.pop(number, None)
        run.enqueued_at.pop(number, None)
        run.told += 1

    # -- the loop ------------------------------------------------------------------------------

    def run_until_done(self, stop: threading.Event | None = None, poll_s: float = 0.5) -> None:
        """Refill and poll until every study has told its budget, or `stop` is set."""
        while not all(run.done for run in self.runs.values()):
            if stop is not None and stop.is_set():
                self.cancel_outstanding()
                return
            self.refill()
            self.poll(poll_s)

    def cancel_outstanding(self) -> None:
        """Withdraw queued jobs and end every outstanding trial FAIL with reason `cancelled`."""
        for run in self.runs.values():
            self.cancel(run)

    def cancel(self, run: StudyRun) -> None:
        """No new trials for `run`; its queued jobs are withdrawn and its outstanding trials end
        FAIL (`cancelled`). A result that still arrives from a running one is dropped as stale."""
        run.n_trials = run.asked
        for number, attempt in list(run.outstanding.items()):
            job = self.queue.fetch_job(job_id(self.prefix, run.name, number, attempt))
            if job is not None and job.get_status(refresh=False) == "queued":
                job.cancel()
            self._finish(
                run,
                number,
                Verdict(
                    state=TrialState.FAIL,
                    fail_reason="cancelled",
                    error="the study was cancelled before this trial ended",
                ),
            )

    def close(self) -> None:
        """Remove this dispatcher's result stream (for a private, per-run stream)."""
        self.connection.delete(self.reply_to)


def _perform(study: optuna.Study, trial: optuna.Trial, call: TrialCall) -> Any:
    """One remote trial call on the real trial: only these methods, nothing by name lookup."""
    args: Any = call.args  # checked by Optuna's own signatures: a mismatch is a TypeError reply
    kwargs: Any = call.kwargs
    match call.method:
        case "suggest_float":
            return trial.suggest_float(*args, **kwargs)
        case "suggest_int":
            return trial.suggest_int(*args, **kwargs)
        case "suggest_categorical":
            return trial.suggest_categorical(*args, **kwargs)
        case "report":
            trial.report(*args, **kwargs)
            return None
        case "should_prune":
            return bool(trial.should_prune())  # pruners may answer with a numpy bool
        case "set_user_attr":
            trial.set_user_attr(*args, **kwargs)
            return None
        case "set_system_attr":  # Optuna 5 dropped Trial.set_system_attr; storages keep it
            key, value = args
            if not isinstance(key, str):
                raise TypeError(f"attribute key must be a str, got {key!r}")
            study._storage.set_trial_system_attr(trial._trial_id, key, value)
            return None
        case "datetime_start":
            start = trial.datetime_start
            return None if start is None else start.isoformat()
    raise ValueError(f"unknown trial method {call.method!r}")


def count_refusal(connection: redis.Redis, prefix: str, kind: str) -> None:
    """Count a refused message in `<prefix>:refused`, by kind: it is an attack or a bug."""
    connection.hincrby(f"{prefix}:refused", kind, 1)


def _verdict(result: TrialResult) -> Verdict:
    match result.outcome:
        case Outcome.COMPLETE:
            return Verdict(state=TrialState.COMPLETE, values=result.values)
        case Outcome.PRUNED:
            return Verdict(state=TrialState.PRUNED)
        case Outcome.FAIL:
            reason = result.fail_reason or FailReason.EXCEPTION
            return Verdict(state=TrialState.FAIL, fail_reason=reason.value, error=result.error)
    raise ProtocolError(f"unknown outcome {result.outcome!r}")
