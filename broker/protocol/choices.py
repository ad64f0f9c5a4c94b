"""The fixed choices a study's definition makes: its sampler, its pruner, its directions.

Each set is declared once, here. The members are str-valued, so the wire carries the same strings
the command line takes (`--sampler tpe`, `"sampler": "tpe"` in a `StudySpec`); the CLI offers them
as its choices (its `--help` and shell completion list them), the spec decodes into them, and the
broker builds its sampler and pruner from them (`optuna_rq.storage.storage_access`).
"""

from __future__ import annotations

import enum

__all__ = ["Direction", "Pruner", "Sampler", "StrChoice"]


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
