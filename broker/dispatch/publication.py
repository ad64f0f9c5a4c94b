"""The trials a dispatcher publishes: what `optuna-rq trials` shows, read from Redis on any
machine (`protocol.trial_summary`), never from the study's storage.

A trial is published when it is sent to a worker (RUNNING, with its sampled parameters) and when
it ends (its values, intermediate values, user attributes, times, fail reason). Each is
noted as it happens (`note`: read back from the storage, as recorded) and waits here until the next
write that acknowledges it: the pipeline that sends the turn's trials and acknowledges its
results, or the one that writes a study's status. So a published trial costs no round trip of
its own, at most one HSET a study per write (`into`), and nothing is published that the storage
has not made durable: the writer runs the dispatcher's `persist` first, as for the acks.

A broker that stops between a tell and that write, or a study that ran before trials were
published, is caught up when the study is taken over (`reconcile`): every trial whose published
entry is missing, refused or not what its storage holds is written again.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from typing import Any

import optuna
import redis
from optuna.trial import FrozenTrial, TrialState

from optuna_rq.dispatch.runs import ATTEMPT_ATTR, RETRY_OF_ATTR
from optuna_rq.dispatch.views import INTERMEDIATE_VALUES_ATTR
from optuna_rq.errors import ProtocolError
from optuna_rq.protocol import (
    Keys,
    Record,
    Signer,
    TrialStateName,
    TrialSummary,
    error_headline,
)
from optuna_rq.protocol.trial_summary import SUMMARY_MAX_BYTES
from optuna_rq.study.optuna_trials import frozen_trial
from optuna_rq.study.verdict import FAIL_ERROR_ATTR, FAIL_REASON_ATTR

__all__ = ["HSET_FIELDS", "TrialPublication", "summary_of"]

log = logging.getLogger("optuna_rq.dispatch")

HSET_FIELDS = 3000
"""Trials one HSET carries at most: a fenced write runs each command inside a Lua script, whose
`unpack` stops near 8,000 arguments (`daemon.fence.MAX_ARGS`)."""

Pending = dict[str, dict[int, bytes]]
"""Study name -> trial number -> its sealed summary, not yet written."""


def summary_of(frozen: FrozenTrial, *, multi: bool) -> TrialSummary:
    """What `optuna-rq trials` shows of `frozen` (`multi`: a multi-objective study's trial, whose
    intermediate values are the lists `report(values, step)` kept in a user attribute). The
    attributes optuna-rq sets (why it failed, which attempt) are fields of their own; the user
    attributes are the rest. Not bounded: see `TrialSummary.bounded`."""
    attrs = dict(frozen.user_attrs)
    reason = _own(attrs, FAIL_REASON_ATTR, str)
    error = _own(attrs, FAIL_ERROR_ATTR, str)
    retry_of = _own(attrs, RETRY_OF_ATTR, int)
    attempt = _own(attrs, ATTEMPT_ATTR, int)
    reported: Any = frozen.intermediate_values
    if multi:
        kept = _own(attrs, INTERMEDIATE_VALUES_ATTR, dict)
        reported = kept or {}
    steps = sorted((int(step), value) for step, value in reported.items() if _step(step))
    values = frozen.values
    return TrialSummary(
        number=frozen.number,
        state=TrialStateName(frozen.state.name.lower()),
        values=None if values is None else [float(v) for v in values],
        params=dict(frozen.params),
        user_attrs=attrs,
        intermediate_values=[[step, value] for step, value in steps],
        started_at=_epoch(frozen.datetime_start),
        ended_at=_epoch(frozen.datetime_complete),
        fail_reason=reason or None,
        error=error_headline(error) or None,
        attempt=attempt if attempt is not None and attempt >= 1 else 1,
        retry_of=retry_of if retry_of is not None and retry_of >= 0 else None,
    )


def _own(attrs: dict[str, Any], key: str, kind: type) -> Any:
    """Take optuna-rq's own attribute `key` out of `attrs` if it has the type ours has (a user's
    attribute of that name and another type stays the user's)."""
    value = attrs.get(key)
    if isinstance(value, kind) and not isinstance(value, bool):
        return attrs.pop(key)
    return None


def _step(step: object) -> bool:
    return isinstance(step, int) or (isinstance(step, str) and step.isdecimal())


def _epoch(moment: Any) -> float | None:
    return None if moment is None else float(moment.timestamp())


class TrialPublication:
    """The trials one dispatcher publishes under `keys`, sealed by `signer` (`keys` None:
    nothing is published, for a dispatcher whose studies nobody lists); with `driven`, as the
    trials of a study a remote Optimizer runs (`Keys.driven_trials_of`, `Record.DRIVEN_TRIAL`,
    with its front-door key)."""

    def __init__(self, keys: Keys | None, signer: Signer, *, driven: bool = False) -> None:
        self.keys = keys
        self.signer = signer
        self.driven = driven
        self.max_bytes = min(SUMMARY_MAX_BYTES, signer.max_message_bytes)
        self._pending: Pending = {}

    def _key(self, study: str) -> str:
        assert self.keys is not None  # nothing is published without them
        return self.keys.driven_trials_of(study) if self.driven else self.keys.trials_of(study)

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def note(self, study: optuna.Study, trial: optuna.Trial | int) -> None:
        """Publish `trial` as its storage holds it now, with the next write (`into`)."""
        if self.keys is None:
            return
        frozen = frozen_trial(study, trial)
        self._pending.setdefault(study.study_name, {})[frozen.number] = self._sealed(study, frozen)

    def _sealed(self, study: optuna.Study, frozen: FrozenTrial) -> bytes:
        name = study.study_name
        return self._summary(study, frozen).sealed(self.signer, study=name, driven=self.driven)

    def _summary(self, study: optuna.Study, frozen: FrozenTrial) -> TrialSummary:
        return summary_of(frozen, multi=len(study.directions) > 1).bounded(self.max_bytes)

    def into(self, pipe: Any, studies: Collection[str] | None = None) -> Pending:
        """Queue on `pipe` the trials waiting (of `studies`; None: of all): one HSET a study
        (a study with more than `HSET_FIELDS` waiting, one per that many). Returns what was
        queued: hand it to `written` once the pipe ran."""
        queued = {
            name: dict(trials)
            for name, trials in self._pending.items()
            if studies is None or name in studies
        }
        for name, trials in queued.items():
            assert self.keys is not None  # nothing is noted without them
            _hset(pipe, self._key(name), trials)
        return queued

    def written(self, queued: Pending) -> None:
        """`queued` (from `into`) is in Redis: it waits no more (unless noted again since)."""
        for name, trials in queued.items():
            waiting = self._pending.get(name)
            if waiting is None:
                continue
            for number, sealed in trials.items():
                if waiting.get(number) is sealed:
                    del waiting[number]
            if not waiting:
                del self._pending[name]

    def forget(self, study: str) -> None:
        """Drop what waits for `study` (deleted: nothing of it is written again)."""
        self._pending.pop(study, None)

    def reconcile(self, connection: redis.Redis, study: optuna.Study) -> int:
        """Publish, now, every trial of `study` (but those WAITING: enqueued, not yet asked)
        whose published entry is missing, refused, or not as its storage holds it; how many.
        What the entries say is compared, not when they were sealed."""
        name = study.study_name
        self.forget(name)  # what waits is older than what the storage holds now
        if self.keys is None:
            return 0
        key = self._key(name)
        stored: dict[bytes, bytes] = connection.hgetall(key)  # type: ignore[assignment]
        stale: dict[int, bytes] = {}
        for frozen in study.get_trials(deepcopy=False):
            if frozen.state is TrialState.WAITING:
                continue
            summary = self._summary(study, frozen)
            if self._published(stored.get(str(frozen.number).encode()), name) != summary.encode():
                stale[frozen.number] = summary.sealed(self.signer, study=name, driven=self.driven)
        if stale:
            pipe = connection.pipeline(transaction=False)
            _hset(pipe, key, stale)
            pipe.execute()
            log.info("study %r: published %d trials", name, len(stale))
        return len(stale)

    def _published(self, stored: bytes | None, study: str) -> bytes | None:
        """The body of a published entry; None if there is none or it is refused (it is then
        written again, as the broker's)."""
        if stored is None:
            return None
        try:
            record = Record.DRIVEN_TRIAL if self.driven else Record.TRIAL
            return self.signer.open(record, stored, bound_to=study)
        except ProtocolError:
            return None


def _hset(pipe: Any, key: str, trials: dict[int, bytes]) -> None:
    items = list(trials.items())
    for start in range(0, len(items), HSET_FIELDS):
        pipe.hset(key, mapping=_fields(items[start : start + HSET_FIELDS]))


def _fields(items: Iterable[tuple[int, bytes]]) -> dict[str, bytes]:
    return {str(number): sealed for number, sealed in items}
