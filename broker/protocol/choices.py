"""The fixed choices the protocol names: a study's sampler, pruner and directions, and the
methods a remote trial calls on the broker's trial.

Each set is declared once, here. The members are str-valued, so the wire carries the same strings
the command line takes (`--sampler tpe`, `"sampler": "tpe"` in a `StudySpec`); the CLI offers them
as its choices (its `--help` and shell completion list them), the spec decodes into them, and the
broker builds its sampler and pruner from them (`optuna_rq.study.algorithms`). A worker's remote
trial names its calls with `TrialMethod`, and the broker runs each by its member.
"""

from __future__ import annotations

import enum

__all__ = ["Direction", "Pruner", "Sampler", "StrChoice", "TrialMethod"]


class StrChoice(str, enum.Enum):
    """A choice that is its own string: `str(Sampler.TPE)` and f-strings give `tpe`, as typed."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def values(cls) -> list[str]:
        """Every choice as typed, in declaration order."""
        return [str(member.value) for member in cls]


class Sampler(StrChoice):
    """`--sampler`: Optuna's samplers by short name."""

    RANDOM = "random"
    TPE = "tpe"
    CMAES = "cmaes"
    NSGAII = "nsgaii"
    GP = "gp"
    QMC = "qmc"


class Pruner(StrChoice):
    """`--pruner`: Optuna's pruners by short name (`none`: never prune)."""

    NONE = "none"
    MEDIAN = "median"
    HYPERBAND = "hyperband"
    SUCCESSIVE_HALVING = "successive-halving"


class Direction(StrChoice):
    """`--direction`: what each objective value is driven to."""

    MINIMIZE = "minimize"
    MAXIMIZE = "maximize"


class TrialMethod(StrChoice):
    """What a `TrialCall` runs on the broker's trial: the `optuna.Trial` method of that name, or
    a read of the trial or its study as a view (`TRIAL`, `STUDY`, `STUDY_TRIALS`)."""

    SUGGEST_FLOAT = "suggest_float"
    SUGGEST_INT = "suggest_int"
    SUGGEST_CATEGORICAL = "suggest_categorical"
    REPORT = "report"
    REPORT_VALUES = "report_values"  # MultiObjectiveTrial.report(values, step)
    SHOULD_PRUNE = "should_prune"
    SET_USER_ATTR = "set_user_attr"
    SET_SYSTEM_ATTR = "set_system_attr"
    SET_CONSTRAINT = "set_constraint"
    # A relative param the worker took from its request: stored as the suggestion would store it.
    SUGGESTED = "suggested"
    RELATIVE_PARAMS = "relative_params"
    RELATIVE_SEARCH_SPACE = "relative_search_space"
    TRIAL = "trial"
    STUDY = "study"
    STUDY_TRIALS = "study_trials"

    @property
    def reads(self) -> bool:
        """Whether the call only reads: the trial as the worker last read it stays true."""
        return self in _READS

    @classmethod
    def named(cls, name: str) -> TrialMethod:
        """The method a call names; LookupError for a name this side does not know (a worker
        of a newer version's), so that the broker answers it, naming it, instead of refusing
        the call unread: `TrialCall.method` travels as text for this."""
        try:
            return cls(name)
        except ValueError:
            raise LookupError(f"unknown trial method {name!r}") from None


_READS = frozenset(
    {
        TrialMethod.RELATIVE_PARAMS,
        TrialMethod.RELATIVE_SEARCH_SPACE,
        TrialMethod.TRIAL,
        TrialMethod.STUDY,
        TrialMethod.STUDY_TRIALS,
    }
)
