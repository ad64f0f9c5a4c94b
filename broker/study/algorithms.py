"""The sampler and the pruner a study's definition names, built as Optuna objects on the broker.

Some samplers need packages Optuna does not install (`SAMPLER_PACKAGES`): whether they are
installed is checked here, where the sampler is built, since the broker's machine is the one
that runs it. A study whose sampler cannot be built fails, saying what to install.
"""

from __future__ import annotations

import importlib.util

import optuna

from optuna_rq.errors import ConfigError
from optuna_rq.protocol.choices import Pruner, Sampler

__all__ = ["SAMPLER_PACKAGES", "SamplerPackageError", "make_pruner", "make_sampler"]

SAMPLER_PACKAGES: dict[Sampler, tuple[str, ...]] = {
    Sampler.CMAES: ("cmaes",),
    Sampler.QMC: ("scipy",),
    Sampler.GP: ("scipy", "torch"),
}
"""The samplers that need packages Optuna does not install for you, and those packages."""


class SamplerPackageError(ConfigError, ImportError):
    """A sampler whose packages are not installed on the broker: a `ConfigError` (the study
    asks for what this broker lacks) and an `ImportError` (what Optuna raises for it)."""


def make_sampler(
    sampler: Sampler, seed: int | None, *, constant_liar: bool = False
) -> optuna.samplers.BaseSampler:
    """The sampler a spec names (`StudySpec.sampler`); `constant_liar` is TPE's. Raises
    `SamplerPackageError`, with the line that installs them, if it needs packages that are not
    installed here."""
    missing = [p for p in SAMPLER_PACKAGES.get(sampler, ()) if importlib.util.find_spec(p) is None]
    if missing:
        raise SamplerPackageError(
            f"sampler {sampler} needs {', '.join(missing)}, not installed on the broker: "
            f"pip install {' '.join(missing)} (where the broker runs), then submit it again"
        )
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
    """The pruner a spec names (`StudySpec.pruner`)."""
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
