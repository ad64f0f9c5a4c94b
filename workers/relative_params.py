"""The relative params a trial's job carries: a define-by-run suggestion answered on the worker.

A relative sampler (multivariate TPE, CMA-ES, NSGA-II, GP, QMC) samples a trial's params
together, once, when the trial first needs one: Optuna's `Trial._suggest` asks it at the first
suggestion of a name that is neither fixed (an enqueued trial's) nor suggested already, nor a
single value. The broker asks it when it sends the trial, and the request carries what it gave
(`RelativeView`): a suggestion that takes one of those params is answered here, without a round
trip, and recorded on the broker as the suggestion would have recorded it (`SUGGESTED`, sent
without a wait). Every other suggestion asks the broker, which raises what Optuna raises.

At one trial at a time the sampler is asked for the same study state either way, so a seeded
study samples as in-process. What the trial shows of it is what in-process Optuna shows:
`relative_search_space` is None until the sampler was asked. Whether a value is in a
distribution is Optuna's private `BaseDistribution._contains`, as in `Trial._suggest`: the one
private name a worker reaches.
"""

from __future__ import annotations

from typing import Any

from optuna.distributions import (
    BaseDistribution,
    check_distribution_compatibility,
    json_to_distribution,
)

from optuna_rq.protocol import RelativeView

__all__ = ["CarriedRelative"]


class CarriedRelative:
    """One trial's relative params as its request carries them, and what it suggested."""

    def __init__(self, view: RelativeView) -> None:
        self.view = view
        self.sampler_asked = view.asked  # as the trial would know in-process
        self._suggested: set[str] = set()
        self._space: dict[str, BaseDistribution] | None = None

    @property
    def _distributions(self) -> dict[str, BaseDistribution]:
        if self._space is None:
            self._space = {name: json_to_distribution(d) for name, d in self.view.space.items()}
        return self._space

    def take(self, name: str, distribution: BaseDistribution) -> tuple[bool, Any]:
        """(True, value) where this suggestion of `name` takes its relative param, as Optuna's
        `Trial._suggest` would; (False, None) where the broker must answer: a name suggested
        before, fixed or sampled there, a single value, a name the sampler left to be sampled
        on its own, a distribution Optuna finds incompatible (the broker raises its error), or a
        value outside it."""
        first = name not in self._suggested
        self._suggested.add(name)
        view = self.view
        if not first or name in view.settled or distribution.single():
            return False, None
        self.sampler_asked = True  # Optuna's `_suggest` reads `relative_params` here
        if name not in view.params:
            return False, None
        try:
            check_distribution_compatibility(self._distributions[name], distribution)
        except ValueError:
            return False, None
        value = view.params[name]
        if not distribution._contains(distribution.to_internal_repr(value)):
            return False, None
        return True, value

    def params(self) -> dict[str, Any]:
        """`trial.relative_params`: reading them asks the sampler, in-process."""
        self.sampler_asked = True
        return dict(self.view.params)

    def search_space(self) -> dict[str, BaseDistribution] | None:
        """`trial.relative_search_space`: None until the sampler was asked."""
        return dict(self._distributions) if self.sampler_asked else None
