"""The sampler and the pruner a study's definition names, built as Optuna objects on the broker."""

from __future__ import annotations

import optuna

from optuna_rq.errors import ConfigError
from optuna_rq.protocol.choices import Pruner, Sampler

__all__ = ["make_pruner", "make_sampler"]


def make_sampler(
    sampler: Sampler, seed: int | None, *, constant_liar: bool = False
) -> optuna.samplers.BaseSampler:
    """The sampler `--sampler` names; `constant_liar` is TPE's (`StudySpec`)."""
    match sampler:
        case Sampler.RANDOM:
            return optuna.samplers.RandomSampler(seed=seed)
        case Sampler.TPE:
            return optuna.samplers.TPESampler(seed=seed, constant_liar=constant_liar)
        case Sampler.CMAES:
            return optuna.samplers.CmaEsSampler(seed=seed)
        case Sampler.NSGAII:
            return optuna.samplers.NSGAIISampler(seed=seed)
        case Sampler.GP:
            return optuna.samplers.GPSampler(seed=seed)
        case Sampler.QMC:
            return optuna.samplers.QMCSampler(seed=seed)
    raise ConfigError(f"unknown sampler {sampler!r}")  # a member added without a case


def make_pruner(pruner: Pruner) -> optuna.pruners.BasePruner:
    """The pruner `--pruner` names."""
    match pruner:
        case Pruner.NONE:
            return optuna.pruners.NopPruner()
        case Pruner.MEDIAN:
            return optuna.pruners.MedianPruner()
        case Pruner.HYPERBAND:
            return optuna.pruners.HyperbandPruner()
        case Pruner.SUCCESSIVE_HALVING:
            return optuna.pruners.SuccessiveHalvingPruner()
    raise ConfigError(f"unknown pruner {pruner!r}")  # a member added without a case
