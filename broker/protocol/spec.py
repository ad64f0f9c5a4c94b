"""The study spec: a submitted study's definition, as the front doors send it and the broker keeps
it (`<prefix>:studies`).

A `StudySpec` is validated when it is built, so the CLI refuses a bad submission before sending
it, and when it is decoded, so the daemon refuses a forged one the same way.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import time
from dataclasses import dataclass
from typing import Any

from optuna_rq.errors import ConfigError, ProtocolError
from optuna_rq.protocol.codec import check_params
from optuna_rq.protocol.keys import DEFAULT_QUEUE, check_queue_name
from optuna_rq.protocol.objectives import parse_objective_path
from optuna_rq.protocol.schema import Float, Int, Map, Message, Text, Texts, version_field, wire
from optuna_rq.spacefile import space_from_data

__all__ = ["DIRECTIONS", "PRUNERS", "SAMPLERS", "StudySpec"]

SAMPLERS = ("random", "tpe", "cmaes", "nsgaii", "gp", "qmc")
PRUNERS = ("none", "median", "hyperband", "successive-halving")
DIRECTIONS = ("minimize", "maximize")

# Samplers whose extra packages Optuna does not install for you.
_SAMPLER_NEEDS = {"cmaes": ("cmaes",), "qmc": ("scipy",), "gp": ("scipy", "torch")}


@dataclass(frozen=True, kw_only=True)
class StudySpec(Message):
    """Everything the broker needs to run one submitted study.

    The wire kinds check what travels; `__post_init__` checks the rules, naming the CLI option
    (a `ConfigError` when built, a `ProtocolError` when decoded).
    """

    name: str = wire(Text())
    objective: str = wire(Text())
    space: dict[str, Any] = wire(Map())
    n_trials: int = wire(Int(minimum=1))
    concurrency: int = wire(Int(minimum=1))
    directions: list[str] = wire(Texts(), default_factory=lambda: ["minimize"])
    sampler: str = wire(Text(), default="tpe")
    seed: int | None = wire(Int(minimum=-(2**63), optional=True), default=None)
    pruner: str = wire(Text(), default="none")
    storage: str | None = wire(Text(optional=True), default=None)
    trial_timeout_s: float | None = wire(Float(minimum=0, optional=True), default=None)
    max_retries: int = wire(Int(minimum=0), default=2)
    priority: float = wire(Float(minimum=0), default=1.0)
    # The resource class its trials go to (`--queue gpu`): workers started with that --queue.
    queue: str = wire(Text(), default=DEFAULT_QUEUE)
    submitted_at: float = wire(Float(), default_factory=time.time)
    v: int = version_field()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"--study-name must be a non-empty name, got {self.name!r}")
        parse_objective_path(self.objective)
        space_from_data(self.space)  # every suggestion validated
        try:
            check_params(self.space)
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from exc
        _positive_int("--n-trials", self.n_trials)
        _positive_int("--concurrency", self.concurrency)
        if not self.directions or any(d not in DIRECTIONS for d in self.directions):
            raise ConfigError(f"--direction must be minimize or maximize, got {self.directions}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler {self.sampler!r}: choose one of {', '.join(SAMPLERS)}")
        missing = [m for m in _SAMPLER_NEEDS.get(self.sampler, ()) if not _installed(m)]
        if missing:
            raise ConfigError(
                f"--sampler {self.sampler} needs {', '.join(missing)}: "
                f"pip install {' '.join(missing)} (on the broker's machine)"
            )
        if self.pruner not in PRUNERS:
            raise ConfigError(f"--pruner {self.pruner!r}: choose one of {', '.join(PRUNERS)}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ConfigError(f"--seed must be an integer, got {self.seed!r}")
        if self.trial_timeout_s is not None and not _positive_number(self.trial_timeout_s):
            raise ConfigError(f"--trial-timeout must be > 0 seconds, got {self.trial_timeout_s!r}")
        if (
            isinstance(self.max_retries, bool)
            or not isinstance(self.max_retries, int)
            or (self.max_retries < 0)
        ):
            raise ConfigError(f"--max-retries must be an integer >= 0, got {self.max_retries!r}")
        if not _positive_number(self.priority):
            raise ConfigError(f"--priority must be a number > 0, got {self.priority!r}")
        check_queue_name(self.queue)
        if self.storage is not None and not isinstance(self.storage, str):
            raise ConfigError(f"--storage must be a URL, got {self.storage!r}")

    @property
    def inputs(self) -> dict[str, Any]:
        """The space as `Optimizer` inputs: suggestions and fixed values."""
        return space_from_data(self.space)

    def with_changes(self, **changes: Any) -> StudySpec:
        return dataclasses.replace(self, **changes)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _positive_int(option: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option} must be an integer >= 1, got {value!r}")


def _positive_number(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
