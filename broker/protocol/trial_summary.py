"""A trial as the broker publishes it, for `optuna-rq trials` on any machine that reaches Redis.

The broker (or whatever dispatches a study: `optuna_rq.dispatch.publication`) writes one
`TrialSummary` per trial into the hash `Keys.trials_of(study)`, keyed by the trial's number, when
the trial is sent to a worker and when it ends, in the same fenced write that acknowledges its
result. A front door reads them there (`read_trial_summaries`) and never opens the study's
storage, whose path or server is the broker's, not its own.

Each entry is sealed like a status (`Record.TRIAL`, bound to the study's name, signed by the
broker alone): with signing on, an entry the broker did not sign is refused, never believed. Its
body names its trial's number, so an entry copied under another number is refused too. A study
a remote Optimizer runs (its status is a driven one: `protocol.status`) has its trials published
by that Optimizer's dispatcher into `Keys.driven_trials_of(study)`, sealed as
`Record.DRIVEN_TRIAL` with the front-door key it holds, and read as such (`driven`): neither kind
opens as the other, and a name the broker takes later starts with no trials of the Optimizer's.

An entry is at most `SUMMARY_MAX_BYTES`: a trial's earliest intermediate values, then its user
attributes, its error text and its parameters are left out until it fits, and `truncated` names
what was (the study's storage holds them all).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from optuna_rq.errors import ProtocolError
from optuna_rq.protocol.codec import check_params
from optuna_rq.protocol.keys import Keys
from optuna_rq.protocol.schema import (
    Choice,
    Float,
    Floats,
    Int,
    Kind,
    Map,
    Message,
    Text,
    WrongValue,
    version_field,
    wire,
)
from optuna_rq.protocol.signing import Record, Signer

if TYPE_CHECKING:
    import redis

__all__ = [
    "SUMMARY_MAX_BYTES",
    "RefusedTrial",
    "TrialStateName",
    "TrialSummary",
    "read_trial_summaries",
]

SUMMARY_MAX_BYTES = 16 * 1024
"""The most one published trial takes (its sealed envelope aside), whatever it reported."""


class TrialStateName(str, enum.Enum):
    """A published trial's state: Optuna's `TrialState`, by its lower-case name."""

    RUNNING = "running"
    COMPLETE = "complete"
    PRUNED = "pruned"
    FAIL = "fail"
    WAITING = "waiting"

    @property
    def ended(self) -> bool:
        return self in (TrialStateName.COMPLETE, TrialStateName.PRUNED, TrialStateName.FAIL)


class Steps(Kind):
    """Intermediate values: `[step, value]` pairs, oldest step first; a multi-objective study's
    value is a list, one per objective (msgpack keys are str only, so steps travel in pairs)."""

    def check(self, value: Any) -> list[list[Any]]:
        if not isinstance(value, list) or not all(_is_step(pair) for pair in value):
            raise WrongValue("a list of [step, value] pairs (a value: a float or a list of them)")
        return [[pair[0], _floats(pair[1])] for pair in value]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_step(pair: Any) -> bool:
    if not isinstance(pair, list) or len(pair) != 2:
        return False
    step, value = pair
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        return False
    if isinstance(value, list):
        return bool(value) and all(_is_number(v) for v in value)
    return _is_number(value)


def _floats(value: Any) -> float | list[float]:
    return [float(v) for v in value] if isinstance(value, list) else float(value)


class _Names(Kind):
    """A list of field names (possibly empty)."""

    def check(self, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise WrongValue("a list of str")
        return list(value)


_COUNT = Int(minimum=0)


@dataclass(frozen=True, kw_only=True)
class TrialSummary(Message):
    """One trial: what `optuna-rq trials` shows of it. Times are epoch seconds."""

    number: int = wire(_COUNT)
    state: TrialStateName = wire(Choice(TrialStateName))
    values: list[float] | None = wire(Floats(), default=None)
    params: dict[str, Any] = wire(Map(), default_factory=dict)
    user_attrs: dict[str, Any] = wire(Map(), default_factory=dict)
    intermediate_values: list[list[Any]] = wire(Steps(), default_factory=list)
    started_at: float | None = wire(Float(optional=True), default=None)
    ended_at: float | None = wire(Float(optional=True), default=None)
    fail_reason: str | None = wire(Text(optional=True), default=None)
    error: str | None = wire(Text(optional=True, nonempty=False), default=None)
    attempt: int = wire(Int(minimum=1), default=1)  # which run at its params (a retry: 2, ...)
    retry_of: int | None = wire(Int(minimum=0, optional=True), default=None)
    truncated: list[str] = wire(_Names(), default_factory=list)  # fields cut to fit the bound
    v: int = version_field()

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return max(0.0, self.ended_at - self.started_at)

    def bounded(self, max_bytes: int = SUMMARY_MAX_BYTES) -> TrialSummary:
        """This summary cut to at most `max_bytes` encoded: its earliest intermediate values,
        then its user attributes, its error text and its parameters go first. Attributes msgpack
        cannot carry (`check_params`) are shown as their text."""
        summary = replace(self, user_attrs=_carried(self.user_attrs))
        if len(summary.encode()) <= max_bytes:
            return summary
        steps = summary.intermediate_values
        keep = len(steps)
        while keep and len(summary.encode()) > max_bytes:
            keep //= 2
            kept = steps[len(steps) - keep :]
            summary = _cut(summary, "intermediate_values", intermediate_values=kept)
        for name, emptied in (("user_attrs", {}), ("error", None), ("params", {})):
            if len(summary.encode()) <= max_bytes:
                break
            summary = _cut(summary, name, **{name: emptied})
        return summary

    def sealed(self, signer: Signer, *, study: str, driven: bool = False) -> bytes:
        """What the publisher stores under the trial's number in `Keys.trials_of(study)`: the
        broker (`Record.TRIAL`), or with `driven` the remote Optimizer that runs the study
        (`Record.DRIVEN_TRIAL`)."""
        return signer.seal(_record(driven), self.encode(), bound_to=study)

    @classmethod
    def opened(
        cls, raw: bytes, signer: Signer, *, study: str, field: str, driven: bool = False
    ) -> TrialSummary:
        """The summary stored under `field` of study `study`'s hash, if the broker (with
        `driven`: a front-door key, the remote Optimizer's) sealed it for that study and it is
        the trial that field names; ProtocolError saying why not."""
        what = f"the published trial {field} of study {study!r}"
        signed_by = "a front-door key (a remote Optimizer's)" if driven else "the broker"
        try:
            body = signer.open(_record(driven), raw, bound_to=study)
        except ProtocolError as exc:
            raise ProtocolError(f"{what} is not signed by {signed_by}, refused: {exc}") from None
        try:
            summary = cls.decode(body, max_bytes=signer.max_message_bytes)
        except ProtocolError as exc:
            raise ProtocolError(f"{what} is unreadable: {exc}") from None
        if str(summary.number) != field:
            raise ProtocolError(f"{what} is trial {summary.number}'s, refused")
        return summary


def _record(driven: bool) -> Record:
    return Record.DRIVEN_TRIAL if driven else Record.TRIAL


def _cut(summary: TrialSummary, name: str, **changes: Any) -> TrialSummary:
    truncated = summary.truncated if name in summary.truncated else [*summary.truncated, name]
    return replace(summary, truncated=truncated, **changes)


def _carried(attrs: dict[str, Any]) -> dict[str, Any]:
    """`attrs` with each value msgpack cannot carry (or too deep, or too long) as its text."""
    carried: dict[str, Any] = {}
    for key, value in attrs.items():
        try:
            check_params({key: value})
        except ProtocolError:
            value = repr(value)
        carried[str(key)] = value
    return carried


@dataclass(frozen=True)
class RefusedTrial:
    """An entry of a study's published trials that does not open (`TrialSummary.opened`): not
    signed by the broker, another trial's, or not a summary at all. Shown as refused."""

    field: str
    why: str

    @property
    def number(self) -> int | None:
        return int(self.field) if self.field.isdecimal() else None


def read_trial_summaries(
    connection: redis.Redis, keys: Keys, signer: Signer, study: str, *, driven: bool = False
) -> list[TrialSummary | RefusedTrial]:
    """Every trial of `study` the broker published (with `driven`: the remote Optimizer that
    runs it), by number (a refused entry is a `RefusedTrial`, after the others)."""
    key = keys.driven_trials_of(study) if driven else keys.trials_of(study)
    stored: dict[bytes, bytes] = connection.hgetall(key)  # type: ignore[assignment]
    opened: list[TrialSummary] = []
    refused: list[RefusedTrial] = []
    for raw_field, raw in stored.items():
        field = raw_field.decode(errors="replace")
        try:
            summary = TrialSummary.opened(raw, signer, study=study, field=field, driven=driven)
            opened.append(summary)
        except ProtocolError as exc:
            refused.append(RefusedTrial(field=field, why=str(exc)))
    opened.sort(key=lambda summary: summary.number)
    refused.sort(key=lambda entry: (entry.number is None, entry.number or 0, entry.field))
    return [*opened, *refused]
