"""The messages between the broker and the workers: trial requests, results, and trial calls.

Each is a frozen `Message` whose fields are declared once with their wire kind; `encode` and a
strict `decode` come from that declaration (see `codec`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from optuna_rq.errors import ProtocolError
from optuna_rq.protocol.codec import Param, check_params
from optuna_rq.protocol.keys import INCARNATION_PATTERN, AttemptId
from optuna_rq.protocol.schema import (
    Bool,
    Choice,
    Float,
    Floats,
    Int,
    Kind,
    List,
    Map,
    Matching,
    Message,
    Text,
    version_field,
    wire,
)

__all__ = [
    "CallError",
    "FailReason",
    "Outcome",
    "RelativeView",
    "TrialCall",
    "TrialCallReply",
    "TrialRequest",
    "TrialResult",
]


def _incarnation() -> Any:
    """The field naming the incarnation of the study a message is for (`Keys`)."""
    return wire(Matching(INCARNATION_PATTERN, "an incarnation id (12 lowercase hex digits)"))


def _token() -> Any:
    """The attempt's token: made by the dispatcher that issued the job (`Signer.attempt_token`
    of its job id; empty with signing off), given back by every result and call of the attempt.
    A worker key signs results for any attempt; the token proves the worker was given this one."""
    return wire(Text(nonempty=False), default="")


class Outcome(str, enum.Enum):
    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"
    FAIL = "FAIL"


class FailReason(str, enum.Enum):
    """Why a trial failed: on the wire, in the trial's `fail_reason` attribute, in metrics."""

    EXCEPTION = "exception"
    TIMEOUT = "timeout"
    WORKER_LOST = "worker_lost"
    IMPORT_ERROR = "import_error"
    BAD_RETURN = "bad_return"
    CANCELLED = "cancelled"
    NOT_ALLOWED = "not_allowed"
    BAD_SIGNATURE = "bad_signature"  # the objective's parameters do not take the space's inputs


class CallError(str, enum.Enum):
    """Why a `TrialCall` failed, so the objective raises what an in-process trial would.

    VALUE, TYPE, NOT_IMPLEMENTED and RUNTIME are Optuna's own exceptions (raised on the worker as
    `ValueError`, `TypeError`, `NotImplementedError`, `RuntimeError`); REFUSED is the broker's
    (the trial is not running here, an unknown method, a storage error): `RemoteTrialError`.
    """

    VALUE = "value"
    TYPE = "type"
    NOT_IMPLEMENTED = "not_implemented"
    RUNTIME = "runtime"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True, kw_only=True)
class TrialRequest(Message):
    """Broker -> worker: run `objective` with `params` as attempt `attempt` of one trial of one
    incarnation of a study; what the worker names for the attempt (its lease, its cancel mark,
    its reply list) it names from this request alone (`attempt_id`)."""

    study: str = wire(Text())
    incarnation: str = _incarnation()
    trial_number: int = wire(Int(minimum=0))
    attempt: int = wire(Int(minimum=1))
    objective: str = wire(Text())  # "package.module:function"
    params: dict[str, Param] = wire(Map())
    n_objectives: int = wire(Int(minimum=1))  # the study's directions: the length of a return
    reply_to: str = wire(Text())  # the Redis stream the result goes to
    token: str = _token()
    # The trial's relative search space and params, as its sampler gave them (`RelativeView`):
    # a define-by-run objective's suggestion that takes one is answered on the worker. None:
    # none carried, every suggestion asks the broker.
    relative: dict[str, Any] | None = wire(Map(optional=True), default=None)
    v: int = version_field()

    def __post_init__(self) -> None:
        if self.relative is not None:
            RelativeView.from_wire(self.relative)

    def encode(self) -> bytes:
        """msgpack bytes; ProtocolError, naming the input, for params msgpack cannot carry."""
        check_params(self.params)
        if self.relative is not None:
            check_params(self.relative["params"])
        return Message.encode(self)

    @property
    def relative_view(self) -> RelativeView | None:
        return None if self.relative is None else RelativeView.from_wire(self.relative)

    @property
    def attempt_id(self) -> AttemptId:
        """The attempt this request runs, as `Keys` names it."""
        return AttemptId(
            reply_to=self.reply_to,
            study=self.study,
            incarnation=self.incarnation,
            trial_number=self.trial_number,
            attempt=self.attempt,
        )


@dataclass(frozen=True, slots=True)
class RelativeView:
    """What a `TrialRequest` carries of its trial's relative sampling (its `relative` field):
    the relative search space (Optuna's JSON of each distribution) and params, whether the
    sampler had been asked for them before the request was sealed (the study's space sampled
    there), and the names `settled` then: fixed (an enqueued trial's) or suggested already.
    The first suggestion of a name not settled takes its relative param, as in Optuna."""

    space: dict[str, str]
    params: dict[str, Param]
    asked: bool
    settled: frozenset[str]

    def to_wire(self) -> dict[str, Any]:
        return {
            "space": self.space,
            "params": self.params,
            "asked": self.asked,
            "settled": sorted(self.settled),
        }

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> RelativeView:
        """ProtocolError for a map of another shape."""
        space, params = data.get("space"), data.get("params")
        asked, settled = data.get("asked"), data.get("settled")
        if (
            set(data) != {"space", "params", "asked", "settled"}
            or not isinstance(space, dict)
            or not all(isinstance(v, str) for v in space.values())
            or not isinstance(params, dict)
            or not set(params) <= set(space)
            or not isinstance(asked, bool)
            or not isinstance(settled, list)
            or not all(isinstance(n, str) for n in settled)
        ):
            raise ProtocolError("TrialRequest.relative: not a relative search space and params")
        return cls(space=space, params=params, asked=asked, settled=frozenset(settled))


@dataclass(frozen=True, slots=True, kw_only=True)
class TrialResult(Message):
    """Worker -> broker: how one attempt of a trial ended.

    COMPLETE carries `values` (one per objective; NaN is allowed on the wire, the broker
    decides); FAIL carries a `fail_reason`; `values` is nil unless COMPLETE. The broker records
    it only for the attempt it names, of the incarnation it names, and only with that attempt's
    `token`.
    """

    study: str = wire(Text())
    incarnation: str = _incarnation()
    trial_number: int = wire(Int(minimum=0))
    attempt: int = wire(Int(minimum=1))
    outcome: Outcome = wire(Choice(Outcome))
    values: list[float] | None = wire(Floats())
    fail_reason: FailReason | None = wire(Choice(FailReason, optional=True))
    error: str | None = wire(Text(optional=True, nonempty=False))
    worker: str = wire(Text(nonempty=False))
    duration_s: float = wire(Float(minimum=0))
    token: str = _token()  # the request's
    v: int = version_field()

    def __post_init__(self) -> None:
        outcome, values, reason = self.outcome, self.values, self.fail_reason
        if outcome is Outcome.COMPLETE and (values is None or reason is not None):
            raise ProtocolError("TrialResult: COMPLETE needs values and no fail_reason")
        if outcome is Outcome.PRUNED and (values is not None or reason is not None):
            raise ProtocolError("TrialResult: PRUNED has neither values nor a fail_reason")
        if outcome is Outcome.FAIL and (reason is None or values is not None):
            raise ProtocolError("TrialResult: FAIL needs a fail_reason and no values")


@dataclass(frozen=True, slots=True, kw_only=True)
class TrialCall(Message):
    """Worker -> broker: one call a remote trial makes on the broker's real `optuna.Trial`.

    Calls travel on the result stream, so a `report` reaches the trial before the result that
    follows it; when `reply` is true the broker answers with a `TrialCallReply` on the attempt's
    `Keys.reply_list`. `seq` numbers the attempt's calls from 1.
    """

    study: str = wire(Text())
    incarnation: str = _incarnation()
    trial_number: int = wire(Int(minimum=0))
    attempt: int = wire(Int(minimum=1))
    seq: int = wire(Int(minimum=1))
    method: str = wire(Text())  # a `TrialMethod`, as text: see `TrialMethod.named`
    args: list[Param] = wire(List())
    kwargs: dict[str, Param] = wire(Map())
    reply: bool = wire(Bool())
    token: str = _token()  # the request's
    v: int = version_field()

    def encode(self) -> bytes:
        check_params({"args": self.args, "kwargs": self.kwargs})
        return Message.encode(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class TrialCallReply(Message):
    """Broker -> worker: the value a `TrialCall` returned, or why it failed (`error`, and which
    exception the objective raises for it: `error_kind`, nil when `ok`), and the warnings Optuna
    gave on the broker (the worker warns them again, where in-process code would see them).

    It names the call it answers (study, incarnation, trial, attempt and `seq`): a worker takes
    only the answer to the call it waits for (`answers`)."""

    study: str = wire(Text())
    incarnation: str = _incarnation()
    trial_number: int = wire(Int(minimum=0))
    attempt: int = wire(Int(minimum=1))
    seq: int = wire(Int(minimum=1))
    ok: bool = wire(Bool())
    value: Param = wire(Kind())
    error: str | None = wire(Text(optional=True, nonempty=False))
    error_kind: CallError | None = wire(Choice(CallError, optional=True), default=None)
    warnings: list[Param] = wire(List(), default_factory=list)  # [category, message] pairs
    v: int = version_field()

    @classmethod
    def to(cls, call: TrialCall, **answer: Any) -> TrialCallReply:
        """The reply to `call`, naming it, with `answer`'s fields (ok, value, error, ...)."""
        return cls(
            study=call.study,
            incarnation=call.incarnation,
            trial_number=call.trial_number,
            attempt=call.attempt,
            seq=call.seq,
            **answer,
        )

    def answers(self, call: TrialCall) -> bool:
        """Whether this is the answer to `call`: the same study, incarnation, trial, attempt
        and call."""
        return (self.study, self.incarnation, self.trial_number, self.attempt, self.seq) == (
            call.study,
            call.incarnation,
            call.trial_number,
            call.attempt,
            call.seq,
        )
