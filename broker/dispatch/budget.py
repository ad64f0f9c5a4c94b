"""A run's budget (`Budget`): the trials it may ask, has asked and has had reported, changed only
through its named operations."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Budget"]


@dataclass(slots=True)
class Budget:
    """How many trials a run may ask (`n_trials`), has asked (`asked`: retries do not count)
    and has had recorded (`told`). Changed only through its operations."""

    n_trials: int
    asked: int = 0
    told: int = 0

    @property
    def left(self) -> int:
        """Trials it may still ask (below zero when a study taken over asked more than its
        budget now allows)."""
        return self.n_trials - self.asked

    def spend(self, n: int = 1) -> None:
        """`n` trials were asked (or requested of the sampler process)."""
        self.asked += n

    def refund(self, n: int = 1) -> None:
        """`n` trials requested were never created: they are unspent."""
        self.asked -= n

    def count_reported(self) -> None:
        self.told += 1

    def wind_down(self) -> None:
        """Ask no more: the budget becomes what was asked."""
        self.n_trials = self.asked

    def resize(self, n_trials: int) -> None:
        """The budget becomes `n_trials` (a change of the study: more, or fewer)."""
        self.n_trials = n_trials

    def restore(self, asked: int) -> None:
        """A study taken over has asked `asked` trials already."""
        self.asked = asked
