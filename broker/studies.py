"""Submitted studies: their settings (`StudySpec`), samplers, pruners and storages.

A `StudySpec` is validated when it is built, so the CLI refuses a bad submission before sending
it and the daemon refuses a forged one the same way. On the wire it is a versioned msgpack map.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import msgpack
import optuna

from optuna_rq.connection import redact_url
from optuna_rq.errors import ConfigError, ProtocolError
from optuna_rq.objectives import parse_objective_path
from optuna_rq.protocol import check_params, decode_map
from optuna_rq.spacefile import space_from_data

__all__ = [
    "PRUNERS",
    "SAMPLERS",
    "StudySpec",
    "make_pruner",
    "make_sampler",
    "open_storage",
]

log = logging.getLogger("optuna_rq.broker")

SPEC_VERSION = 1
SAMPLERS = ("random", "tpe", "cmaes", "nsgaii", "gp", "qmc")
PRUNERS = ("none", "median", "hyperband", "successive-halving")
DIRECTIONS = ("minimize", "maximize")

# Samplers whose extra packages Optuna does not install for you.
_SAMPLER_NEEDS = {"cmaes": ("cmaes",), "qmc": ("scipy",), "gp": ("scipy", "torch")}


@dataclass(frozen=True, kw_only=True)
class StudySpec:
    """Everything the broker needs to run one submitted study."""

    name: str
    objective: str
    space: dict[str, Any]
    n_trials: int
    concurrency: int
    directions: list[str] = field(default_factory=lambda: ["minimize"])
    sampler: str = "tpe"
    seed: int | None = None
    pruner: str = "none"
    storage: str | None = None
    trial_timeout_s: float | None = None
    max_retries: int = 2
    priority: float = 1.0
    submitted_at: float = field(default_factory=time.time)
    v: int = SPEC_VERSION

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
        if self.storage is not None and not isinstance(self.storage, str):
            raise ConfigError(f"--storage must be a URL, got {self.storage!r}")

    @property
    def inputs(self) -> dict[str, Any]:
        """The space as `Optimizer` inputs: suggestions and fixed values."""
        return space_from_data(self.space)

    def encode(self) -> bytes:
        packed: bytes = msgpack.packb(asdict(self), use_bin_type=True)
        return packed

    @classmethod
    def decode(cls, raw: bytes) -> StudySpec:
        """Strict: unknown or missing fields and bad values are ProtocolErrors."""
        data = decode_map(raw, what="StudySpec")
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise ProtocolError(
                f"StudySpec fields differ: unknown {sorted(set(data) - names)}, "
                f"missing {sorted(names - set(data))}"
            )
        if data["v"] != SPEC_VERSION:
            raise ProtocolError(f"StudySpec version {data['v']!r}, expected {SPEC_VERSION}")
        try:
            return cls(**data)
        except (ConfigError, TypeError) as exc:
            raise ProtocolError(f"StudySpec is invalid: {exc}") from exc

    def with_changes(self, **changes: Any) -> StudySpec:
        values = asdict(self)
        values.update(changes)
        return StudySpec(**values)


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


def make_sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    match name:
        case "random":
            return optuna.samplers.RandomSampler(seed=seed)
        case "tpe":
            return optuna.samplers.TPESampler(seed=seed)
        case "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed)
        case "nsgaii":
            return optuna.samplers.NSGAIISampler(seed=seed)
        case "gp":
            return optuna.samplers.GPSampler(seed=seed)
        case "qmc":
            return optuna.samplers.QMCSampler(seed=seed)
    raise ConfigError(f"unknown sampler {name!r}")


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    match name:
        case "none":
            return optuna.pruners.NopPruner()
        case "median":
            return optuna.pruners.MedianPruner()
        case "hyperband":
            return optuna.pruners.HyperbandPruner()
        case "successive-halving":
            return optuna.pruners.SuccessiveHalvingPruner()
    raise ConfigError(f"unknown pruner {name!r}")


_memory = optuna.storages.InMemoryStorage()


def default_storage_url(state: Path) -> str:
    return f"journal:///{state / 'studies.journal'}"


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for `url`: `memory`, `journal:///path`, or any RDB URL Optuna takes.

    `redis://` gives Optuna's JournalRedis, with a warning: it unpickles a snapshot key on load,
    so anyone who can write to that Redis could run code in the broker.
    """
    if url == "memory":
        return _memory
    if url.startswith("journal://"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.removeprefix("journal://"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith(("redis://", "rediss://")):
        from optuna.storages.journal import JournalRedisBackend, JournalStorage

        log.warning(
            "storage %s: Optuna's JournalRedis unpickles a snapshot key on load, so anyone who "
            "can write to that Redis can run code in the broker; prefer the journal file, "
            "sqlite or postgresql",
            redact_url(url),
        )
        return JournalStorage(JournalRedisBackend(url))
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as exc:
        raise ConfigError(f"storage URL {url!r} was rejected by Optuna: {exc}") from exc
