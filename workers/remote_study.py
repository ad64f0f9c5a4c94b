"""`trial.study` on a worker: a read-only view of the study the broker owns.

Every read asks the broker afresh (one round trip; `trials` carries every finished trial, so it
is the one to read sparingly). `sampler` and `pruner` are stand-ins that name the broker's
(`ComponentView`): they sample and prune on the broker. Writes (`tell`, `set_user_attr`,
`stop`, ...) raise `NotImplementedError`: the broker is the study's single writer; set
attributes on the trial, and stop a run from an `Optimizer` callback or with a stop condition.
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Callable, Container
from typing import Any

from optuna.distributions import json_to_distribution
from optuna.pruners import BasePruner
from optuna.samplers import BaseSampler
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from optuna_rq.protocol import TrialMethod

__all__ = ["ComponentView", "RemoteStudy", "frozen_from_view"]

Fetch = Callable[[TrialMethod], Any]
"""Asks the broker for one view ("study", "study_trials") and returns it."""

_WRITES = (
    "add_trial",
    "add_trials",
    "ask",
    "enqueue_trial",
    "optimize",
    "set_metric_names",
    "set_system_attr",
    "set_user_attr",
    "stop",
    "tell",
)


def frozen_from_view(view: dict[str, Any]) -> FrozenTrial:
    """A `FrozenTrial` from the map the broker sends (`optuna_rq.dispatch.views`)."""
    return FrozenTrial(
        number=view["number"],
        state=TrialState[view["state"]],
        value=None,
        values=view["values"],
        datetime_start=_moment(view["datetime_start"]),
        datetime_complete=_moment(view["datetime_complete"]),
        params=view["params"],
        distributions={k: json_to_distribution(d) for k, d in view["distributions"].items()},
        user_attrs=view["user_attrs"],
        system_attrs=view["system_attrs"],
        intermediate_values={int(k): v for k, v in view["intermediate_values"].items()},
        trial_id=view["number"],  # the storage's id is the broker's business
    )


def _moment(text: str | None) -> datetime.datetime | None:
    return None if text is None else datetime.datetime.fromisoformat(text)


class RemoteStudy:
    """What `trial.study` gives on a worker: the study's reads, as `optuna.Study` has them."""

    def __init__(self, fetch: Fetch) -> None:
        self._fetch = fetch

    def _view(self) -> dict[str, Any]:
        view: dict[str, Any] = self._fetch(TrialMethod.STUDY)
        return view

    @property
    def study_name(self) -> str:
        return str(self._view()["study_name"])

    @property
    def directions(self) -> list[StudyDirection]:
        return [StudyDirection[name] for name in self._view()["directions"]]

    @property
    def direction(self) -> StudyDirection:
        directions = self.directions
        if len(directions) > 1:  # Optuna's own error
            raise RuntimeError(
                "A single direction cannot be retrieved from a multi-objective study. Consider "
                "using Study.directions to retrieve a list containing all directions."
            )
        return directions[0]

    @property
    def metric_names(self) -> list[str] | None:
        names = self._view()["metric_names"]
        return None if names is None else list(names)

    @property
    def sampler(self) -> ComponentView:
        """A read-only stand-in for the broker's sampler (`ComponentView`)."""
        return ComponentView("sampler", self._view()["sampler"], BaseSampler)

    @property
    def pruner(self) -> ComponentView:
        """A read-only stand-in for the broker's pruner (`ComponentView`)."""
        return ComponentView("pruner", self._view()["pruner"], BasePruner)

    @property
    def user_attrs(self) -> dict[str, Any]:
        return dict(self._view()["user_attrs"])

    @property
    def system_attrs(self) -> dict[str, Any]:
        return dict(self._view()["system_attrs"])

    @property
    def best_trial(self) -> FrozenTrial:
        """The best trial as `optuna.Study.best_trial` has it; ValueError before any trial
        completes, RuntimeError in a multi-objective study (as Optuna raises)."""
        view = self._view()
        if view["best_trial"] is None:
            kind, message = view["best_trial_error"]
            raise (RuntimeError if kind == "RuntimeError" else ValueError)(message)
        return frozen_from_view(view["best_trial"])

    @property
    def best_value(self) -> float:
        value = self.best_trial.value
        assert value is not None  # a best trial is COMPLETE
        return value

    @property
    def best_params(self) -> dict[str, Any]:
        return self.best_trial.params

    @property
    def best_trials(self) -> list[FrozenTrial]:
        return [frozen_from_view(v) for v in self._view()["best_trials"]]

    @property
    def trials(self) -> list[FrozenTrial]:
        """The finished trials (COMPLETE, PRUNED, FAIL), oldest first. Running trials, this one
        included, are not in the view: what they hold changes while you read it."""
        return self.get_trials()

    def get_trials(
        self, deepcopy: bool = True, states: Container[TrialState] | None = None
    ) -> list[FrozenTrial]:
        trials = [frozen_from_view(v) for v in self._fetch(TrialMethod.STUDY_TRIALS)]
        return trials if states is None else [t for t in trials if t.state in states]

    def __getattr__(self, name: str) -> Any:
        if name in _WRITES:
            raise NotImplementedError(
                f"trial.study.{name}() on a worker: the study is read-only here, the broker is "
                "its only writer (set attributes on the trial; stop a run from an Optimizer "
                "callback or with a stop condition: --timeout, --target, --patience)"
            )
        raise AttributeError(
            f"trial.study on a worker is a read-only view and has no {name!r} (it has "
            "study_name, directions, direction, metric_names, sampler, pruner, user_attrs, "
            "system_attrs, best_trial, best_value, best_params, best_trials, trials, get_trials)"
        )

    def __repr__(self) -> str:
        return "RemoteStudy(<read-only view of the broker's study>)"


class ComponentView:
    """`trial.study.sampler` or `trial.study.pruner` on a worker: the broker's samples and
    prunes there, so the worker gets a stand-in that names its class (`module`, `qualname`)
    and that `isinstance` takes for it wherever this process has that class loaded (Optuna's
    own, or one defined in a served module): `isinstance(trial.study.sampler, TPESampler)`
    holds as in-process. Nothing is imported for it. Any attribute of the real one raises
    AttributeError, saying so."""

    def __init__(self, role: str, where: list[str], base: type) -> None:
        self.role = role
        self.module, self.qualname = str(where[0]), str(where[1])
        self._cls = _loaded_class(self.module, self.qualname, base)

    @property  # type: ignore[misc]  # isinstance() consults it, as it does for unittest.mock
    def __class__(self) -> type:
        return self._cls or ComponentView

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "role" not in self.__dict__:  # copy, pickle: not ours
            raise AttributeError(name)
        raise AttributeError(
            f"trial.study.{self.role}.{name} on a worker: the {self.role} ({self.qualname}) "
            "runs on the broker; a worker sees only which class it is (module, qualname, "
            "isinstance)"
        )

    def __repr__(self) -> str:
        return f"<read-only view of the broker's {self.role}: {self.module}.{self.qualname}>"


def _loaded_class(module: str, qualname: str, base: type) -> type | None:
    """The class `module.qualname` if this process has loaded its module and it is a `base`."""
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return found if isinstance(found, type) and issubclass(found, base) else None
