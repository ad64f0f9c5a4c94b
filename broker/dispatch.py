"""The dispatch loop: ask -> process -> enqueue; results -> tell -> acknowledge -> refill.

The cap is exact: a study never has more than `concurrency` trials sent to workers and not yet
told. A result is told at most once (stale or repeated results are acknowledged, counted and
dropped), and only then is its slot refilled. To keep the sampler off that path, each study at
its cap asks one trial ahead (`ASK_AHEAD`): sampled while the workers run, RUNNING in the storage
but not sent, it goes out the moment a slot frees, in the same round trip as the acknowledgement.

An attempt whose worker is lost (its lease lapsed, or its worker reported it `worker_lost`) is
told FAIL and, under the study's retry policy, its params run again as a new trial that records
which one it retries (`retry_of`). Retries do not eat the budget until they run out: `n_trials`
counts trials that are not retries, so the budget is exact across broker restarts too.
"""

from __future__ import annotations

import logging
import math
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

from optuna_rq import failpoints
from optuna_rq.connection import wait_for_redis
from optuna_rq.errors import ConfigError, ProtocolError
from optuna_rq.leases import LeaseWatch, Watched
from optuna_rq.protocol import (
    CALL_FIELD,
    DEFAULT_LEASE_TTL_S,
    GROUP,
    REPLY_TTL_S,
    RESULT_FIELD,
    RUN_TRIAL,
    FailReason,
    Keys,
    Outcome,
    Signer,
    TrialCall,
    TrialCallReply,
    TrialRequest,
    TrialResult,
    check_params,
    parse_objective_path,
    trial_queue,
)
from optuna_rq.space import Suggestion, process
from optuna_rq.verdict import Verdict, tell

__all__ = ["ATTEMPT_ATTR", "RETRY_OF_ATTR", "Dispatcher", "StudyRun"]

log = logging.getLogger("optuna_rq.dispatch")

ASK_AHEAD = 1
"""Trials a study at its cap keeps asked and sampled, ready to send when a slot frees."""

FINISHED_JOB_TTL_S = 10
"""How long RQ keeps a trial's job once it finished (the result itself is in the stream)."""

RETRY_OF_ATTR = "retry_of"
"""User attribute of a retry: the number of the trial whose lost attempt it runs again."""
ATTEMPT_ATTR = "attempt"
"""User attribute of a retry: which attempt at those params it is (the first is 1, unmarked)."""


class DispatchObserver:
    """Hooks the dispatcher calls as trials move; the base does nothing (metrics override it)."""

    def asked(self, study: str, ask_s: float) -> None:
        pass

    def told(
        self,
        study: str,
        state: str,
        reason: FailReason | None,
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
    max_retries: int = 2  # re-runs of a trial whose worker was lost
    slots: int | None = None  # the fair share the daemon grants; None: the cap alone
    outstanding: dict[int, int] = field(default_factory=dict)  # trial number -> attempt
    # Asked ahead, not sent: attempt, and its request (None: built when sent).
    ready: dict[int, tuple[int, bytes | None]] = field(default_factory=dict)
    trials: dict[int, optuna.Trial] = field(default_factory=dict, repr=False)  # both of those
    enqueued_at: dict[int, float] = field(default_factory=dict, repr=False)  # epoch seconds
    unsent: set[int] = field(default_factory=set)  # outstanding, not known to be enqueued
    asked: int = 0  # budget spent: trials asked that are not retries
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
        return self.asked >= self.n_trials and not self.outstanding and not self.ready

    @property
    def wants_trial(self) -> bool:
        """Whether a slot is free and a trial can fill it (one asked ahead, or budget left)."""
        return len(self.outstanding) < self.limit and (
            bool(self.ready) or self.asked < self.n_trials
        )

    def occupy(self, number: int, attempt: int) -> None:
        """Trial `number` takes a slot; it is unsent until its enqueue is known to be done."""
        self.outstanding[number] = attempt
        self.unsent.add(number)
        self.peak_outstanding = max(self.peak_outstanding, len(self.outstanding))

    def sent(self, number: int, at: float) -> None:
        """Trial `number`'s job is enqueued (at `at`, epoch seconds)."""
        self.unsent.discard(number)
        self.enqueued_at[number] = at

    @property
    def limit(self) -> int:
        """How many trials may be outstanding now: the cap, or less under fair share."""
        return self.concurrency if self.slots is None else min(self.concurrency, self.slots)

    @property
    def demand(self) -> int:
        """Slots this study could use now: its cap, or fewer near the end of its budget."""
        left = self.n_trials - self.asked + len(self.outstanding) + len(self.ready)
        return min(self.concurrency, left)

    def reattach(self) -> None:
        """Take over a study that already has trials: the ones that are not retries count
        against the budget; RUNNING ones are outstanding (their results may still arrive, or
        already have; the dispatcher enqueues the ones a stopped broker never enqueued).

        A RUNNING trial that a retry already runs again (the last broker stopped between
        starting the retry and failing it) is failed now, as that broker would have.
        """
        trials = self.study.get_trials(deepcopy=False)
        retried = {t.user_attrs[RETRY_OF_ATTR] for t in trials if RETRY_OF_ATTR in t.user_attrs}
        asked = [t for t in trials if t.state is not TrialState.WAITING]
        self.asked = sum(1 for t in asked if RETRY_OF_ATTR not in t.user_attrs)
        self.outstanding, self.ready, self.trials = {}, {}, {}
        for frozen in trials:
            if frozen.state is not TrialState.RUNNING:
                continue
            if frozen.number in retried:
                error = "its worker was lost; the trial that retries it had already started"
                tell(self.study, frozen.number, _lost_verdict(error))
                continue
            self.outstanding[frozen.number] = int(frozen.user_attrs.get(ATTEMPT_ATTR, 1))
            self.trials[frozen.number] = optuna.Trial(self.study, frozen._trial_id)
        self.unsent = set(self.outstanding)  # the dispatcher sends them, or keeps them ready


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
        lease_grace_s: float = DEFAULT_LEASE_TTL_S,
        lease_check_s: float = 0.25,
    ) -> None:
        self.connection = connection
        self.signer = signer or Signer()
        self.observer = observer or DispatchObserver()
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.reply_to = reply_to
        self.consumer = consumer or f"{socket.gethostname()}:{os.getpid()}"
        self.queue = trial_queue(connection, queue)
        self.runs: dict[str, StudyRun] = {}
        self.dropped_results = 0  # stale or repeated: acknowledged, counted, never told
        self.refused_results = 0  # not a valid (or validly signed) message
        self.lost_attempts = 0  # attempts whose worker was lost
        self.leases = LeaseWatch(
            connection, intermediate_key=self.queue.intermediate_queue_key, grace_s=lease_grace_s
        )
        self.lease_check_s = lease_check_s
        self._next_lease_check = 0.0
        self._group_ready = False
        self._read_pending = True  # first read this consumer's unacknowledged results
        self._acks: list[bytes] = []  # results told, acknowledged with the next sends

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

    def after_outage(self) -> None:
        """Redis was unreachable: read unacknowledged results again, and give every lease time
        to be renewed before counting it lost."""
        self.leases.reset()
        self._read_pending = True
        self._group_ready = False

    # -- ask -> process -> enqueue -------------------------------------------------------------

    def refill(self) -> int:
        """Send trials until every study is at its cap or has asked its budget (first the trials
        asked but not known to be enqueued: after a restart or an outage), then ask ahead. The
        sends and the pending acknowledgements go to Redis in one round trip."""
        if any(run.unsent for run in self.runs.values()):
            self._send_unsent()
        # One MULTI/EXEC, as RQ's own enqueue is: a connection lost midway enqueues all or none,
        # never a job saved but not pushed onto the queue (it would look queued forever).
        pipe = self.connection.pipeline(transaction=True)
        sending: list[tuple[StudyRun, int]] = []
        for run in self.runs.values():
            while run.wants_trial:
                if run.ready:
                    number = next(iter(run.ready))  # the oldest: asked first, sent first
                    attempt, payload = run.ready.pop(number)
                else:
                    number, attempt, payload = self._ask(run), 1, None
                run.occupy(number, attempt)
                payload = payload or self._request(run, number)
                if payload is not None:
                    self._enqueue(run, number, payload, pipe)
                    sending.append((run, number))
        self._ack(pipe)
        if len(pipe):
            pipe.execute()  # on an outage, the sends stay unsent and the acks pending: redone
        self._acks = []
        now = time.time()
        for run, number in sending:
            run.sent(number, now)
        self._ask_ahead()
        return len(sending)

    def _ask_ahead(self) -> None:
        """Sample the next trials of the studies at their cap while their workers run."""
        for run in self.runs.values():
            while (
                0 < run.limit <= len(run.outstanding)
                and len(run.ready) < ASK_AHEAD
                and run.asked < run.n_trials
            ):
                number = self._ask(run)
                payload = self._request(run, number)
                if payload is not None:
                    run.ready[number] = (1, payload)

    def _ask(self, run: StudyRun) -> int:
        started = time.perf_counter()
        trial = run.study.ask()
        self.observer.asked(run.name, time.perf_counter() - started)
        run.asked += 1
        run.trials[trial.number] = trial
        failpoints.hit("after_ask")
        return trial.number

    def _start(self, run: StudyRun, trial: optuna.Trial, *, attempt: int) -> None:
        """Send `trial` now (a retry: it takes the slot of the attempt it replaces)."""
        run.trials[trial.number] = trial
        run.occupy(trial.number, attempt)
        self._send(run, trial.number)

    def _send(self, run: StudyRun, number: int) -> None:
        """Enqueue the outstanding trial `number` on its own."""
        payload = self._request(run, number)
        if payload is None:
            return
        self._enqueue(run, number, payload, None)
        run.sent(number, time.time())

    def _request(self, run: StudyRun, number: int) -> bytes | None:
        """The sealed request for trial `number`, its params sampled by `process` (a trial that
        already has them, after a restart, gets the same ones). None if Optuna rejects the space:
        the trial is then told FAIL, never left RUNNING."""
        trial = run.trials[number]
        attempt = run.outstanding.get(number, 1)
        try:
            params = dict(process(trial, deepcopy(run.inputs)))
            request = TrialRequest(
                study=run.name,
                trial_number=number,
                attempt=attempt,
                objective=run.objective,
                params=params,
                n_objectives=len(run.study.directions),
                reply_to=self.reply_to,
            )
            return self.signer.seal(request.encode())
        except Exception as exc:
            log.error("study %r trial %d could not be sampled: %s", run.name, number, exc)
            self._finish(
                run,
                number,
                Verdict(state=TrialState.FAIL, fail_reason=FailReason.EXCEPTION, error=str(exc)),
            )
            return None

    def _enqueue(self, run: StudyRun, number: int, payload: bytes, pipeline: Any) -> None:
        self.queue.enqueue_call(
            func=RUN_TRIAL,
            args=(payload,),
            job_id=self._job_id(run, number),
            timeout=math.ceil(run.trial_timeout_s) if run.trial_timeout_s else -1,
            # Kept briefly once finished (`rq info` shows them): deleting a job at once costs
            # its worker seven more round trips (workers/bookkeeping.py).
            result_ttl=FINISHED_JOB_TTL_S,
            failure_ttl=24 * 3600,
            description=f"{run.name} trial {number}",
            pipeline=pipeline,
        )

    def _send_unsent(self) -> None:
        """Enqueue the unsent trials whose job does not exist. Results are read first: a job
        that finished while nobody watched is gone, and its result waits in the stream. Beyond
        the cap (a trial asked ahead before a restart) they wait, ready, for a slot."""
        self._drain()
        for run in self.runs.values():
            numbers = sorted(n for n in run.unsent if n in run.outstanding)
            pipe = self.connection.pipeline(transaction=False)
            for number in numbers:
                pipe.exists(self.queue.job_class.key_for(self._job_id(run, number)))
            missing = []
            for number, exists in zip(numbers, pipe.execute(), strict=True):
                if exists:  # enqueued before the restart or the outage: it runs, or ran
                    run.unsent.discard(number)
                else:
                    missing.append(number)
            for number in missing:
                if len(run.outstanding) > run.limit:
                    run.unsent.discard(number)
                    run.ready[number] = (run.outstanding.pop(number), None)
                else:
                    log.info("study %r: enqueueing trial %d again", run.name, number)
                    self._send(run, number)
            run.unsent &= set(run.outstanding)

    def _job_id(self, run: StudyRun, number: int) -> str:
        return self.keys.job_id(run.name, number, run.outstanding[number])

    # -- results -> tell -> acknowledge --------------------------------------------------------

    def poll(self, block_s: float | None = 1.0) -> int:
        """Read the results that arrived (waiting up to `block_s`; None: not at all), tell
        them, and fail the attempts whose workers are lost; return how many trials were told."""
        handled, _entries = self._read(block_s)
        now = time.monotonic()
        if now >= self._next_lease_check:
            self._next_lease_check = now + self.lease_check_s
            handled += self._check_leases()
        return handled

    def _drain(self) -> None:
        """Read and tell every result already in the stream."""
        while self._read(None)[1]:
            pass

    def _read(self, block_s: float | None) -> tuple[int, int]:
        """One read of the result stream: (trials told, entries read)."""
        self._ensure_group()
        response: Any = None
        if self._read_pending:
            self.flush()  # told before an outage: not to be read (and dropped as stale) again
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
                block=None if block_s is None else max(1, int(block_s * 1000)),
            )
        if not response:
            return 0, 0
        handled = 0
        entry_ids: list[bytes] = []
        for _stream, entries in response:
            for entry_id, fields in entries:
                entry_ids.append(entry_id)
                if CALL_FIELD in fields:
                    self._serve_call(fields[CALL_FIELD])
                else:
                    handled += self._handle(fields.get(RESULT_FIELD, b""), entry_id)
        # Acknowledged only after telling: a broker that dies in between reads them again, and
        # telling is idempotent. Where the told trials' slots are refilled, with those sends.
        self._acks += entry_ids
        if not self._will_send():
            self.flush()
        return handled, len(entry_ids)

    def _will_send(self) -> bool:
        """Whether the next `refill` sends a trial (and so acknowledges the results read)."""
        return any(run.wants_trial for run in self.runs.values())

    def _ack(self, pipe: Any) -> None:
        if self._acks:
            pipe.xack(self.reply_to, GROUP, *self._acks)
            pipe.xdel(self.reply_to, *self._acks)

    def flush(self) -> None:
        """Acknowledge the results told and not yet acknowledged."""
        if self._acks:
            pipe = self.connection.pipeline(transaction=False)
            self._ack(pipe)
            pipe.execute()
            self._acks = []

    # -- lost workers -> retries ---------------------------------------------------------------

    def _check_leases(self) -> int:
        """Fail (and retry) the attempts whose leases say their worker is lost; how many."""
        watched: dict[str, tuple[StudyRun, int, int]] = {}
        for run in self.runs.values():
            for number, attempt in run.outstanding.items():
                if number not in run.unsent:
                    watched[self.keys.job_id(run.name, number, attempt)] = (run, number, attempt)
        lost = self.leases.check(Watched(j, Keys.lease(self.reply_to, j)) for j in watched)
        if not lost:
            return 0
        self._drain()  # a result that came in just before its lease went is told, not lost
        count = 0
        for item, why in lost:
            run, number, attempt = watched[item.job_id]
            if self.runs.get(run.name) is run and run.outstanding.get(number) == attempt:
                self._lost(run, number, why)
                count += 1
        return count

    def _lost(self, run: StudyRun, number: int, why: str) -> None:
        """The attempt at trial `number` will never report: fail it `worker_lost`, and run its
        params again as a new trial while retries last (the budget unit passes to the retry)."""
        attempt = run.outstanding[number]
        self.lost_attempts += 1
        started = time.perf_counter()
        if attempt > run.max_retries:
            error = f"{why}; not retried: {attempt} attempts, max retries {run.max_retries}"
            log.warning("study %r trial %d failed: %s", run.name, number, error)
            self._finish(run, number, _lost_verdict(error))
            retry = None
        else:
            # The retry exists before the lost trial is told: a broker that stops in between
            # finds both, and `reattach` completes the step.
            retry = self._create_retry(run, number, attempt + 1)
            error = f"{why}; retried as trial {retry.number}"
            log.warning("study %r trial %d: %s", run.name, number, error)
            self._finish(run, number, _lost_verdict(error))
        self.observer.told(
            run.name,
            TrialState.FAIL.name,
            FailReason.WORKER_LOST,
            tell_s=time.perf_counter() - started,
            start_delay_s=None,
            result_age_s=None,
        )
        if retry is not None:
            self._start(run, retry, attempt=attempt + 1)

    def _create_retry(self, run: StudyRun, number: int, attempt: int) -> optuna.Trial:
        storage = run.study._storage
        lost = storage.get_trial(run.trials[number]._trial_id)
        template = optuna.trial.create_trial(
            state=TrialState.RUNNING,
            params=lost.params,
            distributions=lost.distributions,
            user_attrs={RETRY_OF_ATTR: number, ATTEMPT_ATTR: attempt},
        )
        trial_id = storage.create_new_trial(run.study._study_id, template_trial=template)
        return optuna.Trial(run.study, trial_id)

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
            # Rare, and worth seeing from outside (`<prefix>:dropped`): a worker that came back.
            self.connection.hincrby(self.keys.dropped, "result", 1)
            return 0
        if result.fail_reason is FailReason.WORKER_LOST:  # its supervisor saw the worker die
            self._lost(run, result.trial_number, result.error or "the worker was lost")
            return 1
        failpoints.hit("before_tell")
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
            key = Keys.reply_list(self.reply_to, call.trial_number, call.attempt)
            pipe = self.connection.pipeline(transaction=False)
            pipe.rpush(key, self.signer.seal(encoded))
            pipe.expire(key, REPLY_TTL_S)
            pipe.execute()

    def _finish(self, run: StudyRun, number: int, verdict: Verdict) -> None:
        tell(run.study, run.trials.get(number, number), verdict)
        if number in run.outstanding:
            self.leases.forget(self._job_id(run, number))
        # Its reply list, if any, expires by itself (no extra command).
        run.outstanding.pop(number, None)
        run.ready.pop(number, None)
        run.trials.pop(number, None)
        run.enqueued_at.pop(number, None)
        run.unsent.discard(number)
        run.told += 1

    # -- the loop ------------------------------------------------------------------------------

    def run_until_done(
        self,
        stop: threading.Event | None = None,
        poll_s: float = 0.5,
        give_up_after_s: float = 600.0,
    ) -> None:
        """Refill and poll until every study has told its budget, or `stop` is set. A Redis
        outage is ridden out (trials keep running on the workers, their results wait); one
        longer than `give_up_after_s` raises RedisUnavailableError."""
        stop = stop or threading.Event()
        while not all(run.done for run in self.runs.values()):
            if stop.is_set():
                self.cancel_outstanding()
                return
            try:
                self.refill()
                self.poll(poll_s)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if wait_for_redis(self.connection, exc, stop=stop, give_up_s=give_up_after_s):
                    self.after_outage()
        self.flush()

    def cancel_outstanding(self) -> None:
        """Withdraw queued jobs and end every outstanding trial FAIL with reason `cancelled`."""
        for run in self.runs.values():
            self.cancel(run)

    def cancel(self, run: StudyRun) -> None:
        """No new trials for `run`; its queued jobs are withdrawn and its outstanding trials end
        FAIL (`cancelled`). A result that still arrives from a running one is dropped as stale."""
        run.n_trials = run.asked
        for number, attempt in list(run.outstanding.items()):
            job = self.queue.fetch_job(self.keys.job_id(run.name, number, attempt))
            if job is not None and job.get_status(refresh=False) == "queued":
                job.cancel()
        for number in [*run.outstanding, *run.ready]:
            self._finish(
                run,
                number,
                Verdict(
                    state=TrialState.FAIL,
                    fail_reason=FailReason.CANCELLED,
                    error="the study was cancelled before this trial ended",
                ),
            )

    def fail_outstanding(self, error: str) -> None:
        """End every outstanding trial FAIL (`worker_lost`) without a word to Redis: for a broker
        that cannot go on, so that no trial is left RUNNING."""
        for run in self.runs.values():
            for number in [*run.outstanding, *run.ready]:
                self._finish(run, number, _lost_verdict(error))

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
    connection.hincrby(Keys(prefix).refused, kind, 1)


def _lost_verdict(error: str) -> Verdict:
    return Verdict(state=TrialState.FAIL, fail_reason=FailReason.WORKER_LOST, error=error)


def _verdict(result: TrialResult) -> Verdict:
    match result.outcome:
        case Outcome.COMPLETE:
            return Verdict(state=TrialState.COMPLETE, values=result.values)
        case Outcome.PRUNED:
            return Verdict(state=TrialState.PRUNED)
        case Outcome.FAIL:
            reason = result.fail_reason or FailReason.EXCEPTION
            return Verdict(state=TrialState.FAIL, fail_reason=reason, error=result.error)
    raise ProtocolError(f"unknown outcome {result.outcome!r}")
