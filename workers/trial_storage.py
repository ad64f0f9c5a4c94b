"""`trial.storage` of a remote trial: what `optuna.artifacts` reaches of the storage."""

from __future__ import annotations

from typing import Any, NoReturn, Protocol

from optuna_rq.errors import RemoteTrialError

__all__ = ["TrialStorage"]


class _Trial(Protocol):
    """What of its remote trial the storage reaches."""

    @property
    def number(self) -> int: ...
    @property
    def system_attrs(self) -> dict[str, Any]: ...
    def set_system_attr(self, key: str, value: Any) -> None: ...


class TrialStorage:
    """`trial.storage` for `optuna.artifacts`: this trial's system attributes, through the
    broker. The artifact itself goes from the worker straight to the artifact store."""

    def __init__(self, trial: _Trial) -> None:
        self._trial = trial

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._own(trial_id)
        self._trial.set_system_attr(key, value)

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        self._own(trial_id)
        return self._trial.system_attrs

    def _own(self, trial_id: int) -> None:
        if trial_id != self._trial.number:
            raise RemoteTrialError(f"a worker reaches only its own trial, not trial {trial_id}")

    def __getattr__(self, name: str) -> NoReturn:
        raise NotImplementedError(
            f"trial.storage.{name}: a worker has no storage of its own; the broker owns it "
            "(a remote trial serves its own system attributes, for optuna.artifacts)"
        )
