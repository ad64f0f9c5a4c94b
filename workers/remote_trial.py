"""A trial proxy for define-by-run objectives on workers.

An objective that takes a `trial` gets a `RemoteTrial`: its calls travel to the broker, which
runs them on the study's real `optuna.Trial`, so samplers and pruners work exactly as in-process,
with any storage. It is an `optuna.Trial` (so `isinstance` checks and `optuna.artifacts` accept
it) with `MultiObjectiveTrial`'s surface besides: `report(values, step)` in a multi-objective
study, `suggest_int(name, low, high, step=1, log=False)`, `set_system_attr`.

A suggestion that takes a relative param its job carries is answered here, and recorded on the
broker without a wait (`workers.relative_params`). Any other call that answers something (a
suggestion, `should_prune`, a read) takes one round trip and raises what in-process Optuna
raises (`ValueError`, `TypeError`, `NotImplementedError`), checked here before the trip where
the arguments alone decide, else by Optuna on the broker; Optuna's warnings there are warned
here again. What the storage holds (`params`, `distributions`, `user_attrs`, `system_attrs`,
...) is read from the broker, once after each change. `RemoteTrialError` means the broker refused
the call (with its reason), or would refuse it (over a message limit: `workers.call_limits`,
checked before it is sent), or did not answer.

A call that only records (`report`, `set_user_attr`, `set_system_attr`, `set_constraint`) is
sent without waiting (`_post`), not even for Redis (`workers.call_line`): everything Optuna would
raise or warn for it is decided here, from its arguments and the steps this trial reported. Calls
and the trial's result travel on one stream, in order, so a recorded value is in the study before
the trial's next call (a `should_prune` after a `report` sees it) and before its result.

Replies come on the attempt's own list (`Keys.reply_list`, named by study, incarnation, trial and
attempt), and each names the call it answers: a trial takes only the answer to the call it waits
for. Anything else on its list is dropped, and the trial waits on for its answer, within the same
deadline: an answer to a call that timed out is counted in `<prefix>:dropped` as `reply` and
logged once per trial; a reply that does not open (junk, unsigned, or with signing on not sealed
by the broker: anyone can push to a list) in `<prefix>:refused` as `reply`, logged once per
process. The list is read nowhere else (`RemoteTrial._answer_to` judges every reply).
"""

from __future__ import annotations

import datetime
import logging
import math
import time
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

import optuna
import redis
from optuna.distributions import (
    BaseDistribution,
    CategoricalChoiceType,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
    json_to_distribution,
)

from optuna_rq.errors import ProtocolError, RemoteTrialError
from optuna_rq.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    CallError,
    Keys,
    Record,
    Signer,
    TrialCall,
    TrialCallReply,
    TrialMethod,
    TrialRequest,
)
from optuna_rq.protocol.counters import count_dropped, count_refused
from optuna_rq.workers.call_limits import encode_call
from optuna_rq.workers.call_line import CallLine
from optuna_rq.workers.relative_params import CarriedRelative
from optuna_rq.workers.remote_study import RemoteStudy
from optuna_rq.workers.trial_arguments import as_float, as_step, deprecated, storable
from optuna_rq.workers.trial_storage import TrialStorage

__all__ = ["RemoteTrial", "RemoteTrialError"]

log = logging.getLogger("optuna_rq.worker")

CALL_TIMEOUT_S = 60
"""How long a call waits for its answer, in all."""

_RAISES: dict[CallError, type[Exception]] = {
    CallError.VALUE: ValueError,
    CallError.TYPE: TypeError,
    CallError.NOT_IMPLEMENTED: NotImplementedError,
    CallError.RUNTIME: RuntimeError,
}
_WARNS: dict[str, type[Warning]] = {
    "RuntimeWarning": RuntimeWarning,
    "FutureWarning": FutureWarning,
    "DeprecationWarning": DeprecationWarning,
    "ExperimentalWarning": optuna.exceptions.ExperimentalWarning,
}


class RemoteTrial(optuna.Trial):
    """What an objective sees as `trial` on a worker."""

    _refused_logged = False  # a refused reply was logged by this process

    def __init__(
        self, connection: redis.Redis, request: TrialRequest, signer: Signer, *, keys: Keys
    ) -> None:
        # Not optuna.Trial.__init__: the study and its storage are the broker's.
        self._connection = connection
        self._request = request
        self._signer = signer
        self._keys = keys  # its prefix's: where a dropped reply is counted
        self._reply_key = Keys.reply_list(request.attempt_id)
        self._line = CallLine(connection, request.reply_to)  # the calls, in order
        self._seq = 0
        self.dropped_replies = 0  # taken off its list, and not the answer to the call made
        self._stale_replies = 0  # of them, the ones that opened: answers to other calls
        self._view: dict[str, Any] | None = None  # the trial as last read; None after a change
        self._reported: set[int] = set()  # the steps reported, as Optuna's trial knows them
        self._relative: dict[str, Any] | None = None
        self._relative_space: dict[str, BaseDistribution] | None = None
        view = request.relative_view  # the sampler's relative params, asked at the send
        self._carried = None if view is None else CarriedRelative(view)
        self._study_view = RemoteStudy(self._call)
        self._trial_id = request.trial_number  # what optuna.artifacts hands back to `storage`
        self.storage = TrialStorage(self)  # type: ignore[assignment]

    def _new_call(
        self, method: TrialMethod, args: Sequence[Any], kwargs: dict[str, Any], *, reply: bool
    ) -> TrialCall:
        self._seq += 1
        return TrialCall(
            study=self._request.study,
            incarnation=self._request.incarnation,
            trial_number=self._request.trial_number,
            attempt=self._request.attempt,
            seq=self._seq,
            method=method,
            args=list(args),
            kwargs=kwargs,
            reply=reply,
            token=self._request.token,
        )

    def _sealed(self, method: TrialMethod, payload: bytes) -> bytes:
        if not (isinstance(method, TrialMethod) and method.reads):
            self._view = None  # the call may change the trial
        return self._signer.seal(Record.CALL, payload)

    def settle(self) -> None:
        """The objective ended: its calls are in Redis before its result (`CallLine.settle`)."""
        self._line.settle()

    def _post(self, method: TrialMethod, *args: Any, stored: Any = None) -> None:
        """Run `method` on the broker's trial without waiting for it (see the module), after
        the checks that decide its failures here: the message limits, and that `stored` is what
        the broker's storage keeps. A call over the default message limit waits for its answer
        all the same: a broker may allow less than this worker, and its refusal must be heard."""
        payload = encode_call(
            self._new_call(method, args, {}, reply=False),
            max_bytes=self._signer.max_message_bytes,
        )
        storable(stored)
        if len(payload) > DEFAULT_MAX_MESSAGE_BYTES:
            self._call(method, *args)
        else:
            self._line.post(self._sealed(method, payload))

    def _call(self, method: TrialMethod, *args: Any, **kwargs: Any) -> Any:
        """Run `method` on the broker's trial; raise what it raised there."""
        call = self._new_call(method, args, kwargs, reply=True)
        sealed = self._sealed(method, encode_call(call, max_bytes=self._signer.max_message_bytes))
        deadline = time.monotonic() + CALL_TIMEOUT_S
        popped: Any = self._line.call(sealed, self._reply_key, CALL_TIMEOUT_S)
        while True:
            if not popped:
                raise RemoteTrialError(
                    f"trial {self._request.trial_number}: no answer to {method} from the broker "
                    f"within {CALL_TIMEOUT_S}s (is it running?)"
                )
            answer = self._answer_to(call, popped[1])
            if answer is not None:
                break
            left_s = deadline - time.monotonic()  # not the answer: wait on, within the deadline
            popped = left_s > 0 and self._connection.blpop([self._reply_key], timeout=left_s)
        for said in answer.warnings:
            category, message = said if isinstance(said, list) else ("UserWarning", said)
            warnings.warn(str(message), _WARNS.get(str(category), UserWarning), stacklevel=3)
        if not answer.ok:
            _raise(answer, method)
        return answer.value

    def _answer_to(self, call: TrialCall, raw: bytes) -> TrialCallReply | None:
        """The reply in `raw` if it answers `call`; else None, and it is dropped and counted."""
        try:
            body = self._signer.open(Record.REPLY, raw)
            reply = TrialCallReply.decode(body, max_bytes=self._signer.max_message_bytes)
        except ProtocolError as exc:
            self._drop(f"refused a reply (logged once): {exc}", refused=True)
            return None
        if reply.answers(call):
            return reply
        self._drop(
            f"dropped a reply to study {reply.study!r} ({reply.incarnation}) trial "
            f"{reply.trial_number} attempt {reply.attempt} call {reply.seq}: not the answer to "
            f"call {call.seq}",
        )
        return None

    def _drop(self, why: str, *, refused: bool = False) -> None:
        self.dropped_replies += 1
        self._stale_replies += not refused
        if refused:
            count_refused(self._connection, self._keys, "reply")
        else:
            count_dropped(self._connection, self._keys, "reply")
        if refused:  # once per process: a forger may fill every trial's list
            if not RemoteTrial._refused_logged:
                RemoteTrial._refused_logged = True
                log.warning("%s waiting for its answers: %s", self._describe(), why)
        elif self._stale_replies == 1:  # once per trial: its list may hold many
            log.warning("%s waiting for its answers: %s", self._describe(), why)

    def _describe(self) -> str:
        r = self._request
        return f"study {r.study!r} ({r.incarnation}) trial {r.trial_number} (attempt {r.attempt})"

    def _trial_view(self) -> dict[str, Any]:
        if self._view is None:
            self._view = self._call(TrialMethod.TRIAL)
        return self._view

    @property
    def _multi(self) -> bool:
        return self._request.n_objectives > 1

    # -- sampling ----------------------------------------------------------------------------------

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        distribution = FloatDistribution(low, high, log=log, step=step)  # Optuna's ValueErrors
        method = TrialMethod.SUGGEST_FLOAT
        return float(self._suggestion(method, distribution, name, low, high, step=step, log=log))

    def suggest_int(  # step may be positional, as in MultiObjectiveTrial
        self, name: str, low: int, high: int, step: int = 1, log: bool = False
    ) -> int:
        distribution = IntDistribution(low, high, log=log, step=step)
        method = TrialMethod.SUGGEST_INT
        return int(self._suggestion(method, distribution, name, low, high, step=step, log=log))

    def suggest_categorical(  # type: ignore[override]  # one signature for Optuna's overloads
        self, name: str, choices: Sequence[CategoricalChoiceType]
    ) -> CategoricalChoiceType:
        distribution = CategoricalDistribution(list(choices))
        return self._suggestion(TrialMethod.SUGGEST_CATEGORICAL, distribution, name, list(choices))  # type: ignore[no-any-return]

    def _suggestion(
        self, method: TrialMethod, distribution: BaseDistribution, name: str, *args: Any, **kw: Any
    ) -> Any:
        """The relative param the request carries where the suggestion takes one
        (`CarriedRelative.take`), recorded on the broker without a wait; else the broker's."""
        if self._carried is not None:
            taken, value = self._carried.take(name, distribution)
            if taken:
                self._post(TrialMethod.SUGGESTED, name, distribution_to_json(distribution), value)
                return value
        return self._call(method, name, *args, **kw)

    def suggest_uniform(self, name: str, low: float, high: float) -> float:
        deprecated("suggest_uniform", "suggest_float(..., low, high)")
        return self.suggest_float(name, low, high)

    def suggest_loguniform(self, name: str, low: float, high: float) -> float:
        deprecated("suggest_loguniform", "suggest_float(..., low, high, log=True)")
        return self.suggest_float(name, low, high, log=True)

    def suggest_discrete_uniform(self, name: str, low: float, high: float, q: float) -> float:
        deprecated("suggest_discrete_uniform", "suggest_float(..., low, high, step=q)")
        return self.suggest_float(name, low, high, step=q)

    @property
    def relative_params(self) -> dict[str, Any]:
        if self._carried is not None:
            return self._carried.params()
        if self._relative is None:
            self._relative = dict(self._call(TrialMethod.RELATIVE_PARAMS))
        return dict(self._relative)

    @property  # optuna.Trial's is an attribute the trial sets once; here it is read
    def relative_search_space(self) -> dict[str, BaseDistribution] | None:  # type: ignore[override]
        """What the sampler samples relatively: None until it inferred it (the trial's first
        suggestion, or `relative_params`), then fixed for the trial, as in-process."""
        if self._carried is not None:
            return self._carried.search_space()
        if self._relative_space is None:
            space = self._call(TrialMethod.RELATIVE_SEARCH_SPACE)
            if space is None:
                return None
            self._relative_space = {k: json_to_distribution(d) for k, d in space.items()}
        return dict(self._relative_space)

    # -- pruning, constraints and attributes -------------------------------------------------------

    def report(self, value: float | Sequence[float], step: int) -> None:
        """`Trial.report(value, step)`; in a multi-objective study `report(values, step)`, one
        value per objective (kept in the trial's `intermediate_values` user attribute)."""
        many = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
        if self._multi and not many:
            raise NotImplementedError(
                "Trial.report is not supported for multi-objective optimization with one value: "
                f"report one value per objective, trial.report([...{self._request.n_objectives} "
                "values], step)"
            )
        # The value first, then the step, as Optuna checks them: report("foo", -1) is the
        # value's TypeError, not the step's ValueError.
        if many and self._multi:
            values = [as_float(v) for v in value]  # type: ignore[union-attr]
            step = as_step(step)
            if len(values) != self._request.n_objectives:
                raise ValueError(
                    "report(values, step) takes one value per objective: the study has "
                    f"{self._request.n_objectives} directions, got {len(values)} values"
                )
            if self._reported_before(step, "values are", f"step={step}"):
                return
            self._post(TrialMethod.REPORT_VALUES, values, step)
        else:
            number = as_float(value)
            step = as_step(step)
            if self._reported_before(step, "value is", f"`step={step}`"):
                return
            self._post(TrialMethod.REPORT, number, step)

    def _reported_before(self, step: int, what: str, named: str) -> bool:
        """Whether `step` was reported: then, as Optuna does, warn that the value is ignored."""
        if step not in self._reported:
            self._reported.add(step)
            return False
        message = f"The reported {what} ignored because this {named} is already reported."
        warnings.warn(message, UserWarning, stacklevel=3)
        return True

    def should_prune(self) -> bool:
        if self._multi:
            raise NotImplementedError(
                "Trial.should_prune is not supported for multi-objective optimization."
            )
        return bool(self._call(TrialMethod.SHOULD_PRUNE))

    def set_constraint(self, key: str, value: float) -> None:
        number = as_float(value)
        if math.isnan(number):
            raise ValueError(f"Attempted to set a constraint for {key!r}, but NaN is not allowed.")
        self._post(TrialMethod.SET_CONSTRAINT, key, number)

    def set_user_attr(self, key: str, value: Any) -> None:
        self._post(TrialMethod.SET_USER_ATTR, key, value, stored=value)

    def set_system_attr(self, key: str, value: Any) -> None:
        """`MultiObjectiveTrial.set_system_attr` (Optuna 5's `Trial` no longer has one)."""
        self._post(TrialMethod.SET_SYSTEM_ATTR, key, value, stored=value)

    # -- what the storage holds --------------------------------------------------------------------

    @property
    def number(self) -> int:
        return self._request.trial_number

    @property
    def study(self) -> RemoteStudy:  # type: ignore[override]  # a read-only view, not a Study
        """A read-only view of the study (`optuna_rq.workers.remote_study`)."""
        return self._study_view

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._trial_view()["params"])

    @property
    def distributions(self) -> dict[str, BaseDistribution]:
        return {k: json_to_distribution(d) for k, d in self._trial_view()["distributions"].items()}

    @property
    def user_attrs(self) -> dict[str, Any]:
        return dict(self._trial_view()["user_attrs"])

    @property
    def system_attrs(self) -> dict[str, Any]:
        return dict(self._trial_view()["system_attrs"])

    @property
    def constraints(self) -> dict[str, float]:
        return dict(self._trial_view()["constraints"])

    @property
    def intermediate_values(self) -> dict[int, Any]:
        """What was reported, by step: a float each, or in a multi-objective study a list."""
        return {int(k): v for k, v in self._trial_view()["intermediate_values"].items()}

    @property
    def datetime_start(self) -> datetime.datetime | None:
        text = self._trial_view()["datetime_start"]
        return None if text is None else datetime.datetime.fromisoformat(text)

    def __repr__(self) -> str:
        return f"RemoteTrial(study={self._request.study!r}, number={self.number})"


def _raise(answer: TrialCallReply, method: str) -> NoReturn:
    message = answer.error or f"{method} failed on the broker"
    kind = answer.error_kind or CallError.REFUSED
    raise _RAISES.get(kind, RemoteTrialError)(message)
