"""A trial proxy for define-by-run objectives on workers.

An objective that takes a `trial` gets a `RemoteTrial`: its `suggest_*`, `report`,
`should_prune` and `set_*_attr` calls travel to the broker, which runs them on the study's real
`optuna.Trial`, so samplers and pruners work exactly as in-process, with any storage. `report`
and the attribute setters do not wait; `suggest_*` and `should_prune` take one round trip.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import redis
from optuna.distributions import (
    BaseDistribution,
    CategoricalChoiceType,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from optuna_rq.errors import RemoteTrialError
from optuna_rq.protocol import CALL_FIELD, Keys, Signer, TrialCall, TrialCallReply, TrialRequest

__all__ = ["RemoteTrial", "RemoteTrialError"]

CALL_TIMEOUT_S = 60


class RemoteTrial:
    """What an objective sees as `trial` on a worker (the subset of `optuna.Trial` it needs)."""

    def __init__(self, connection: redis.Redis, request: TrialRequest, signer: Signer) -> None:
        self._connection = connection
        self._request = request
        self._signer = signer
        self._reply_key = Keys.reply_list(request.reply_to, request.trial_number, request.attempt)
        self._seq = 0
        self._params: dict[str, Any] = {}
        self._distributions: dict[str, BaseDistribution] = {}
        self._user_attrs: dict[str, Any] = {}
        self._system_attrs: dict[str, Any] = {}
        self._datetime_start: datetime.datetime | None = None

    def _call(self, method: str, *args: Any, reply: bool = True, **kwargs: Any) -> Any:
        self._seq += 1
        call = TrialCall(
            study=self._request.study,
            trial_number=self._request.trial_number,
            attempt=self._request.attempt,
            seq=self._seq,
            method=method,
            args=list(args),
            kwargs=kwargs,
            reply=reply,
        )
        self._connection.xadd(
            self._request.reply_to, {CALL_FIELD: self._signer.seal(call.encode())}
        )
        if not reply:
            return None
        while True:
            popped: Any = self._connection.blpop([self._reply_key], timeout=CALL_TIMEOUT_S)
            if popped is None:
                raise RemoteTrialError(
                    f"trial {self._request.trial_number}: no answer to {method} from the broker "
                    f"within {CALL_TIMEOUT_S}s (is it running?)"
                )
            answer = TrialCallReply.decode(self._signer.open(popped[1], what="TrialCallReply"))
            if answer.seq == self._seq:  # an older seq is a reply to a call that timed out
                break
        if not answer.ok:
            raise RemoteTrialError(answer.error or f"{method} failed on the broker")
        return answer.value

    # -- sampling ----------------------------------------------------------------------------------

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        value = float(self._call("suggest_float", name, low, high, step=step, log=log))
        self._record(name, value, FloatDistribution(low, high, log=log, step=step))
        return value

    def suggest_int(
        self, name: str, low: int, high: int, *, step: int = 1, log: bool = False
    ) -> int:
        value = int(self._call("suggest_int", name, low, high, step=step, log=log))
        self._record(name, value, IntDistribution(low, high, log=log, step=step))
        return value

    def suggest_categorical(
        self, name: str, choices: Sequence[CategoricalChoiceType]
    ) -> CategoricalChoiceType:
        value = self._call("suggest_categorical", name, list(choices))
        self._record(name, value, CategoricalDistribution(list(choices)))
        return value  # type: ignore[no-any-return]

    def suggest_uniform(self, name: str, low: float, high: float) -> float:
        return self.suggest_float(name, low, high)

    def suggest_loguniform(self, name: str, low: float, high: float) -> float:
        return self.suggest_float(name, low, high, log=True)

    def suggest_discrete_uniform(self, name: str, low: float, high: float, q: float) -> float:
        return self.suggest_float(name, low, high, step=q)

    def _record(self, name: str, value: Any, distribution: BaseDistribution) -> None:
        self._params[name] = value
        self._distributions[name] = distribution

    # -- pruning and attributes ----------------------------------------------------------------

    def report(self, value: float, step: int) -> None:
        self._call("report", float(value), int(step), reply=False)

    def should_prune(self) -> bool:
        return bool(self._call("should_prune"))

    def set_user_attr(self, key: str, value: Any) -> None:
        self._call("set_user_attr", key, value, reply=False)
        self._user_attrs[key] = value

    def set_system_attr(self, key: str, value: Any) -> None:
        self._call("set_system_attr", key, value, reply=False)
        self._system_attrs[key] = value

    @property
    def number(self) -> int:
        return self._request.trial_number

    @property
    def params(self) -> dict[str, Any]:
        return dict(self._params)

    @property
    def distributions(self) -> dict[str, BaseDistribution]:
        return dict(self._distributions)

    @property
    def user_attrs(self) -> dict[str, Any]:
        return dict(self._user_attrs)

    @property
    def system_attrs(self) -> dict[str, Any]:
        return dict(self._system_attrs)

    @property
    def datetime_start(self) -> datetime.datetime | None:
        if self._datetime_start is None:
            text = self._call("datetime_start")
            self._datetime_start = None if text is None else datetime.datetime.fromisoformat(text)
        return self._datetime_start

    def __repr__(self) -> str:
        return f"RemoteTrial(study={self._request.study!r}, number={self.number})"
