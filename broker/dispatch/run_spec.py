"""What a run takes from its study's definition (`RunSpec`): a frozen view, replaced whole when
the study changes, and checked as the broker would check a submission."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from optuna_rq.errors import ConfigError, ProtocolError
from optuna_rq.protocol import (
    DEFAULT_QUEUE,
    StudySpec,
    check_incarnation,
    check_params,
    check_queue_name,
    new_incarnation,
    parse_objective_path,
)
from optuna_rq.space.declarations import Suggestion

__all__ = ["RunSpec"]


def _fixed_inputs(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """`inputs` with every suggestion replaced by None: what must survive msgpack as given."""
    return {
        key: (
            None
            if isinstance(value, Suggestion)
            else _fixed_inputs(value)
            if isinstance(value, dict)
            else value
        )
        for key, value in inputs.items()
    }


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """What a run takes from its study's definition, frozen: a change replaces it whole
    (`StudyRun.change`). The budget is not here: the run's `Budget` owns it."""

    objective: str
    inputs: dict[str, Any]
    concurrency: int
    trial_timeout_s: float | None = None
    max_retries: int = 2  # re-runs of a trial whose worker was lost
    queue: str = DEFAULT_QUEUE  # the resource class its trials go to
    # Which incarnation of the study this is (`StudySpec.incarnation`); a run of its own (the
    # remote `Optimizer`) is a new one. Every per-attempt name carries it (`Keys`).
    incarnation: str = field(default_factory=new_incarnation)
    ask_ahead: int = 0  # trials it keeps asked at its cap, ready to send (`StudySpec.ask_ahead`)
    batch: int = 1  # trials sent in one job, at most (`StudySpec.batch`)

    def __post_init__(self) -> None:
        parse_objective_path(self.objective)
        check_queue_name(self.queue, option="queue")
        check_incarnation(self.incarnation)
        try:
            check_params(_fixed_inputs(self.inputs))
        except ProtocolError as exc:
            raise ConfigError(str(exc)) from exc

    @classmethod
    def of(cls, spec: StudySpec) -> RunSpec:
        """The view of a submitted study's spec (a stored spec has its incarnation; one that
        has none is a new incarnation)."""
        return cls(
            objective=spec.objective,
            inputs=spec.inputs,
            concurrency=spec.concurrency,
            trial_timeout_s=spec.trial_timeout_s,
            max_retries=spec.max_retries,
            queue=spec.queue,
            ask_ahead=spec.ask_ahead,
            batch=spec.batch,
            incarnation=spec.incarnation or new_incarnation(),
        )
