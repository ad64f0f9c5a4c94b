"""Remote-trial calls: a define-by-run objective's `trial.suggest_*`, `report`, ... made on a
worker's proxy (`optuna_rq.workers.remote_trial`), run here on the real trial, and answered.

Every call is answered, on its attempt's own reply list (`Keys.reply_list`: named by study,
incarnation, trial and attempt), with a reply that names the call: the value, or the error with
the kind of exception the objective raises for it (`CallError`), and the warnings Optuna gave.
Only the trial's current attempt of the study's current incarnation is served: a call for a
trial that ended, or whose attempt was retried, or that another broker owns, or of an earlier
study of the same name, or of a study that faulted, gets a REFUSED reply with the reason (the
objective raises `RemoteTrialError` at once). So does a call this broker cannot read (over its
message cap, another version): its attempt and token are read without decoding the rest. Only
a call that proves no worker given the job sent it (a seal that does not open, a token not
issued) is refused unanswered, and counted.

Replies wait in `replies` until the dispatcher has made what the calls changed durable (a
suggested parameter, a reported value: the objective goes on from the answer), then go out
together (`replies_into`), in one round trip for a batch of calls with the acknowledgements of
the entries read (`Dispatcher.flush`).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
import redis
from optuna.distributions import json_to_distribution

from optuna_rq.dispatch.boundary import FaultBoundary, Site
from optuna_rq.dispatch.observer import DispatchObserver, count_refusal
from optuna_rq.dispatch.results import issued, unissued
from optuna_rq.dispatch.runs import StudyRun
from optuna_rq.dispatch.views import (
    relative_search_space_view,
    report_values,
    study_trials_view,
    study_view,
    trial_view,
)
from optuna_rq.errors import ProtocolError
from optuna_rq.protocol import (
    PROTOCOL_VERSION,
    REPLY_TTL_S,
    AttemptId,
    CallError,
    Keys,
    Record,
    Signer,
    TrialCall,
    TrialCallReply,
    TrialMethod,
)
from optuna_rq.study.optuna_trials import record_relative_param, set_trial_system_attr

__all__ = ["CallServer"]

log = logging.getLogger("optuna_rq.dispatch")


class CallServer:
    """Serves the calls that arrive on one dispatcher's result stream."""

    def __init__(
        self,
        connection: redis.Redis,
        *,
        prefix: str,
        reply_to: str,
        signer: Signer,
        observer: DispatchObserver,
        boundary: FaultBoundary,
    ) -> None:
        self.connection = connection
        self.boundary = boundary
        self.prefix = prefix
        self.reply_to = reply_to
        self.signer = signer
        self.observer = observer
        self.replies: list[tuple[str, bytes]] = []  # (reply list, sealed reply), not yet sent

    def serve(self, raw: bytes, live: Callable[[str], StudyRun | None]) -> None:
        """Run a remote trial's call on the real trial of its study's run (`live`: the run of a
        study, if it is dispatched and has not faulted); its answer waits in `replies`.

        Every call the worker given the job made is answered, a refusal with the broker's
        reason. Only a call that proves no such worker sent it (a seal that does not open, a
        token not issued) is refused unanswered: an answer goes to the attempt's reply list,
        where that worker takes it for the answer to its own call of that number."""
        try:
            body = self.signer.open(Record.CALL, raw)
            call = TrialCall.decode(body, max_bytes=self.signer.max_message_bytes)
        except ProtocolError as exc:
            self._refuse_unreadable(raw, exc)
            return
        if not issued(call, reply_to=self.reply_to, signer=self.signer):
            self._refuse_unanswered("call token", unissued(call, "call"))
            return
        run = live(call.study)
        record = None if run is None else run.answers(call)
        answer = None
        if run is not None and record is not None:
            with self.boundary.guard(run.name, Site.CALL):
                answer = _answer(run.study, record.trial, call)
        fault = self.boundary.faults.get(call.study)
        if fault is not None:
            error = f"study {call.study!r} failed on the broker: {fault}"
            answer = _failed(call, CallError.REFUSED, error, [])
        elif answer is None:
            error = (
                f"trial {call.trial_number} (attempt {call.attempt}) of study {call.study!r} "
                "is not running on this broker: it ended, failed, or another broker owns it, or "
                "it belongs to an earlier study of that name"
            )
            answer = _failed(call, CallError.REFUSED, error, [])
        try:
            encoded = answer.encode()
        except (TypeError, ValueError) as exc:  # an attribute set in-process msgpack cannot carry
            error = f"the answer to {call.method} cannot travel to the worker: {exc}"
            encoded = _failed(call, CallError.REFUSED, error, []).encode()
        if len(encoded) > self.signer.max_message_bytes:
            error = (
                f"the answer to {call.method} is {len(encoded)} bytes, over the "
                f"{self.signer.max_message_bytes}-byte message limit (raise the limit on both "
                "sides, or read less: trial.study.trials carries every finished trial)"
            )
            encoded = _failed(call, CallError.REFUSED, error, []).encode()
        if call.reply:
            self.replies.append((self._reply_list(call), self.signer.seal(Record.REPLY, encoded)))
        elif not answer.ok:  # a proxy of an older kind that did not wait: at least say so
            log.warning("trial call %s failed: %s", call.method, answer.error)

    def _refuse_unanswered(self, kind: str, why: str) -> None:
        self.observer.refused(kind)
        count_refusal(self.connection, self.prefix, kind, why)

    def _refuse_unreadable(self, raw: bytes, exc: ProtocolError) -> None:
        """A call that does not open or decode is refused. It is answered with why only when
        its seal is good (or signing is off) and it names an attempt with that attempt's token:
        over this broker's size cap, or from another version, the worker given the job learns
        it at once; anything else is counted, unanswered."""
        self._refuse_unanswered("call", str(exc))
        try:
            body = self.signer.open_over_the_cap(Record.CALL, raw)
            named = _Named(**TrialCall.peek(body, _NAMED))
        except ProtocolError:
            return  # a seal that does not open, or no attempt named: nobody to answer
        if not issued(named, reply_to=self.reply_to, signer=self.signer):
            return
        error = (
            f"the broker refused this call: {exc} (the broker takes messages of up to "
            f"{self.signer.max_message_bytes} bytes, of protocol version {PROTOCOL_VERSION}: "
            "give the workers the broker's --max-message-bytes and optuna-rq version)"
        )
        refusal = TrialCallReply(
            study=named.study,
            incarnation=named.incarnation,
            trial_number=named.trial_number,
            attempt=named.attempt,
            seq=named.seq,
            ok=False,
            value=None,
            error=error,
            error_kind=CallError.REFUSED,
        )
        sealed = self.signer.seal(Record.REPLY, refusal.encode())
        self.replies.append((self._reply_list(named), sealed))

    def _reply_list(self, call: TrialCall | _Named) -> str:
        """The attempt's reply list, where its worker waits for the answers to its calls."""
        return Keys.reply_list(
            AttemptId(
                reply_to=self.reply_to,
                study=call.study,
                incarnation=call.incarnation,
                trial_number=call.trial_number,
                attempt=call.attempt,
            )
        )

    def replies_into(self, pipe: Any) -> int:
        """Queue the replies waiting on `pipe`, once what their calls changed is durable; how
        many, for `sent` once it has run (lost with Redis: the calls are read again)."""
        for key, sealed in self.replies:
            pipe.rpush(key, sealed)
            # The reply list expires by itself: nothing to clean up when the trial ends.
            pipe.expire(key, REPLY_TTL_S)
        return len(self.replies)

    def sent(self, count: int) -> None:
        """The first `count` replies waiting went out."""
        del self.replies[:count]

    def drop_replies(self) -> None:
        """Forget the replies waiting: their calls are read again, and answered anew."""
        self.replies = []


_NAMED = ("study", "incarnation", "trial_number", "attempt", "seq", "token")


@dataclass(frozen=True, slots=True)
class _Named:
    """What a call that does not decode names: its attempt, its number, its token."""

    study: str
    incarnation: str
    trial_number: int
    attempt: int
    seq: int
    token: str


def _answer(study: optuna.Study, trial: optuna.Trial, call: TrialCall) -> TrialCallReply:
    # The broker is single-threaded where it touches trials, so catching warnings here sees only
    # this call's; under `-W error` they would otherwise turn into failures.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            value = _perform(study, trial, call)
            error: tuple[CallError, str] | None = None
        except Exception as exc:  # the objective gets the error; the broker serves on
            error = (_kind_of(exc), f"{exc}")
    said: list[Any] = [[w.category.__name__, str(w.message)] for w in caught]
    if error is not None:
        return _failed(call, *error, said)
    return TrialCallReply.to(call, ok=True, value=value, error=None, error_kind=None, warnings=said)


def _failed(call: TrialCall, kind: CallError, error: str, said: list[Any]) -> TrialCallReply:
    return TrialCallReply.to(
        call, ok=False, value=None, error=error, error_kind=kind, warnings=said
    )


def _kind_of(exc: Exception) -> CallError:
    """Which exception the objective raises: Optuna's argument errors as themselves."""
    if isinstance(exc, NotImplementedError):  # a RuntimeError too: test it first
        return CallError.NOT_IMPLEMENTED
    if isinstance(exc, TypeError):
        return CallError.TYPE
    if isinstance(exc, (optuna.exceptions.OptunaError, LookupError)):
        return CallError.REFUSED  # storage trouble: not an argument the objective got wrong
    if isinstance(exc, ValueError):
        return CallError.VALUE
    if isinstance(exc, RuntimeError):
        return CallError.RUNTIME
    return CallError.REFUSED


def _perform(study: optuna.Study, trial: optuna.Trial, call: TrialCall) -> Any:
    """One remote trial call on the real trial: only these methods, nothing by name lookup."""
    args: Any = call.args  # checked by Optuna's own signatures: a mismatch is a TypeError reply
    kwargs: Any = call.kwargs
    match TrialMethod.named(call.method):
        case TrialMethod.SUGGEST_FLOAT:
            return trial.suggest_float(*args, **kwargs)
        case TrialMethod.SUGGEST_INT:
            return trial.suggest_int(*args, **kwargs)
        case TrialMethod.SUGGEST_CATEGORICAL:
            return trial.suggest_categorical(*args, **kwargs)
        case TrialMethod.REPORT:
            trial.report(*args, **kwargs)
            return None
        case TrialMethod.REPORT_VALUES:  # MultiObjectiveTrial.report(values, step)
            warning = report_values(study, trial, *args, **kwargs)
            if warning:
                warnings.warn(warning, UserWarning, stacklevel=1)
            return None
        case TrialMethod.SHOULD_PRUNE:
            return bool(trial.should_prune())  # pruners may answer with a numpy bool
        case TrialMethod.SET_USER_ATTR:
            trial.set_user_attr(*args, **kwargs)
            return None
        case TrialMethod.SET_SYSTEM_ATTR:
            key, value = args
            if not isinstance(key, str):
                raise TypeError(f"attribute key must be a str, got {key!r}")
            set_trial_system_attr(study, trial, key, value)
            return None
        case TrialMethod.SET_CONSTRAINT:
            trial.set_constraint(*args, **kwargs)
            return None
        case TrialMethod.SUGGESTED:  # a relative param the worker took from its request
            name, distribution, value = args
            if not isinstance(name, str) or not isinstance(distribution, str):
                raise TypeError(f"a suggested param is named with its distribution, got {args!r}")
            record_relative_param(trial, name, json_to_distribution(distribution), value)
            return None
        case TrialMethod.RELATIVE_PARAMS:
            return dict(trial.relative_params)
        case TrialMethod.RELATIVE_SEARCH_SPACE:
            return relative_search_space_view(trial)
        case TrialMethod.TRIAL:
            return trial_view(study, trial)
        case TrialMethod.STUDY:
            return study_view(study)
        case TrialMethod.STUDY_TRIALS:
            return study_trials_view(study)
    raise LookupError(f"unknown trial method {call.method!r}")  # a member without a case
