"""Define-by-run objectives that use the whole trial surface
(`--import tests.support.trial_objectives`).

Each records what it saw in user attributes, so a test compares it with the storage, and runs
the same way in-process, so a test compares a remote trial with a real one.
"""

from __future__ import annotations

import math
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.artifacts import FileSystemArtifactStore, upload_artifact
from optuna.distributions import BaseDistribution, FloatDistribution


def _outcome(fn: Any) -> str:
    try:
        fn()
    except Exception as exc:
        return type(exc).__name__
    return "ok"


def surface_single(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -1, 1)
    s = trial.suggest_float("s", 0, 1, step=0.5)
    i = trial.suggest_int("i", 2, 8, 2)  # positional step, as MultiObjectiveTrial has it
    j = trial.suggest_int("j", 1, 64, log=True)
    c = trial.suggest_categorical("c", ["a", "b", None])
    trial.suggest_uniform("u", 0, 1)  # type: ignore[attr-defined]
    trial.suggest_loguniform("lu", 1e-3, 1)  # type: ignore[attr-defined]
    trial.suggest_discrete_uniform("du", 0, 1, 0.25)  # type: ignore[attr-defined]
    trial.suggest_float("x", -5, 5)  # a clash of ranges: Optuna keeps the first
    for step in range(3):
        trial.report(x * x + step, step)
        trial.should_prune()
    trial.set_user_attr("note", {"k": [1, 2]})
    if hasattr(trial, "set_system_attr"):
        trial.set_system_attr("sys", "yes")
    trial.set_constraint("c0", x - 1.5)  # always feasible: best_value must not depend on x
    study = trial.study
    trial.set_user_attr(
        "seen",
        {
            "number": trial.number,
            "params": trial.params,
            "distributions": sorted(trial.distributions),
            "x_high": trial.distributions["x"].high,  # type: ignore[attr-defined]
            "user_attrs": sorted(trial.user_attrs),
            "constraints": trial.constraints,
            "started": trial.datetime_start is not None,
            "relative": sorted(trial.relative_params),
            "directions": [d.name for d in study.directions],
            "direction": study.direction.name,
            "study_user_attrs": study.user_attrs,
            "finished": [t.number for t in study.trials],
            "best": _outcome(lambda: study.best_value),
            "best_params": sorted(study.best_params) if trial.number > 0 else [],
            "values": [i, j, c, s],
        },
    )
    return x * x + i


def surface_multi(trial: optuna.Trial) -> tuple[float, float]:
    x = trial.suggest_float("x", 0, 1)
    k = trial.suggest_int("k", 1, 3, 1)
    for step in range(3):
        trial.report([x + step, 1 - x + step], step)  # type: ignore[arg-type]
    trial.report([9.0, 9.0], 0)  # type: ignore[arg-type]  # a step reported already: ignored
    trial.set_user_attr("mine", k)
    trial.set_system_attr("sys", k)  # type: ignore[attr-defined]
    study = trial.study
    trial.set_user_attr(
        "seen",
        {
            "intermediate": {str(s): v for s, v in trial.intermediate_values.items()},  # type: ignore[attr-defined]
            "params": trial.params,
            "user_attrs": sorted(trial.user_attrs),
            "system_attrs": trial.system_attrs.get("sys"),
            "directions": [d.name for d in study.directions],
            "best_trials": sorted(t.number for t in study.best_trials),
            "finished": [t.number for t in study.trials],
            "report_one": _outcome(lambda: trial.report(1.0, 5)),
            "report_short": _outcome(lambda: trial.report([1.0], 5)),  # type: ignore[arg-type]
            "should_prune": _outcome(trial.should_prune),
            "best_trial": _outcome(lambda: study.best_trial),
            "direction": _outcome(lambda: study.direction),
        },
    )
    return x, 1 - x


def exceptions(trial: optuna.Trial) -> float:
    """Every error case, as the exception type each raised: the same in-process and remote."""
    trial.suggest_float("x", 0, 1)
    cases = {
        "report_negative_step": lambda: trial.report(1.0, -1),
        "report_str_value": lambda: trial.report("abc", 0),  # type: ignore[arg-type]
        "report_str_step": lambda: trial.report(1.0, "s"),  # type: ignore[arg-type]
        "report_list_single": lambda: trial.report([1.0, 2.0], 0),  # type: ignore[arg-type]
        "float_low_high": lambda: trial.suggest_float("a", 1.0, 0.0),
        "float_step_log": lambda: trial.suggest_float("b", 0.1, 1, step=0.1, log=True),
        "int_log_zero": lambda: trial.suggest_int("n", 0, 10, log=True),
        "categorical_empty": lambda: trial.suggest_categorical("e", []),
        "clash": lambda: trial.suggest_categorical("x", ["a"]),
        "constraint_str": lambda: trial.set_constraint("k", "abc"),  # type: ignore[arg-type]
        "constraint_nan": lambda: trial.set_constraint("k", math.nan),
        "best_before_any": lambda: trial.study.best_trial,
        "report_ok": lambda: trial.report(0.5, 0),
    }
    trial.set_user_attr("outcomes", {name: _outcome(fn) for name, fn in cases.items()})
    trial.set_user_attr("after_clash", sorted(trial.distributions))
    return 0.0


def exceptions_multi(trial: optuna.Trial) -> tuple[float, float]:
    cases = {
        "report_one": lambda: trial.report(1.0, 0),
        "should_prune": trial.should_prune,
        "best_trial": lambda: trial.study.best_trial,
        "direction": lambda: trial.study.direction,
        "directions": lambda: trial.study.directions,
    }
    trial.set_user_attr("outcomes", {name: _outcome(fn) for name, fn in cases.items()})
    return 0.0, 0.0


def artifact(trial: optuna.Trial, base: str) -> float:
    x = trial.suggest_float("x", 0, 1)
    path = Path(base) / f"model-{trial.number}.txt"
    path.write_text(f"x={x}")
    os.makedirs(os.path.join(base, "store"), exist_ok=True)
    store = FileSystemArtifactStore(os.path.join(base, "store"))
    artifact_id = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial)
    trial.set_user_attr("artifact_id", artifact_id)
    return x


def dies_once(trial: optuna.Trial, marker: str) -> float:
    """SIGKILLs its own process on the first attempt: the attempt is lost and retried."""
    if not os.path.exists(marker):
        Path(marker).write_text("died")
        os.kill(os.getpid(), signal.SIGKILL)
    trial.set_user_attr("seen_user_attrs", trial.user_attrs)
    return trial.suggest_float("x", 0, 1)


def plain(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0, 1)


def _nested(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


def over_the_limits(trial: optuna.Trial) -> float:
    """Calls the broker would refuse for their size: each raises at once, and the trial goes
    on. Records, for each, the exception's type and message."""
    calls = {
        "user_attr": lambda: trial.set_user_attr("blob", "x" * 2_000_000),
        "system_attr": lambda: trial.set_system_attr("blob", b"x" * 2_000_000),  # type: ignore[attr-defined]
        "categorical_bytes": lambda: trial.suggest_categorical("c", ["x" * 1000] * 2000),
        "categorical_items": lambda: trial.suggest_categorical("n", list(range(20_000))),
        "nested_list": lambda: trial.set_user_attr("rows", {"rows": [0] * 20_000}),
        "deep": lambda: trial.set_user_attr("deep", _nested(40)),
    }
    outcomes = {}
    for name, call in calls.items():
        try:
            call()
            outcomes[name] = ["ok", ""]
        except Exception as exc:
            outcomes[name] = [type(exc).__name__, str(exc)]
    trial.set_user_attr("outcomes", outcomes)
    return trial.suggest_float("x", 0, 1)  # the trial goes on


def _warned(fn: Any) -> str:
    """The outcome of `fn` with warnings raised as errors: a warning's type, as an error's."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return _outcome(fn)


def reports(trial: optuna.Trial) -> float:
    """The values and steps Optuna's own tests/trial_tests report, each case's outcome: the
    value is converted before the step is checked, and a repeated step warns."""
    cases = {
        "float": lambda: trial.report(1.23, 1),
        "nan": lambda: trial.report(math.nan, 2),
        "numeric str": lambda: trial.report("1.23", 3),  # type: ignore[arg-type]
        "inf str": lambda: trial.report("inf", 4),  # type: ignore[arg-type]
        "int": lambda: trial.report(1, 5),
        "np.float32": lambda: trial.report(np.array([1], dtype=np.float32)[0], 6),  # type: ignore[arg-type]
        "None": lambda: trial.report(None, 7),  # type: ignore[arg-type]
        "str": lambda: trial.report("foo", 7),  # type: ignore[arg-type]
        "list": lambda: trial.report([1, 2, 3], 7),  # type: ignore[arg-type]
        "str at a negative step": lambda: trial.report("foo", -1),  # type: ignore[arg-type]
        "float step": lambda: trial.report(1.0, 8.0),  # type: ignore[arg-type]
        "np.int64 step": lambda: trial.report(1.0, np.int64(9)),  # type: ignore[arg-type]
        "None step": lambda: trial.report(1.0, None),  # type: ignore[arg-type]
        "str step": lambda: trial.report(1.0, "foo"),  # type: ignore[arg-type]
        "list step": lambda: trial.report(1.0, [1, 2, 3]),  # type: ignore[arg-type]
        "negative step": lambda: trial.report(1.0, -1),
    }
    outcomes = {name: _outcome(fn) for name, fn in cases.items()}
    outcomes["a step again"] = _warned(lambda: trial.report(1.0, 1))
    trial.set_user_attr("outcomes", outcomes)
    return 0.0


class RelativeSampler(optuna.samplers.BaseSampler):
    """Samples x and y relatively, anything else independently at its low end (as the sampler
    of Optuna's own test of relative parameters does)."""

    def infer_relative_search_space(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return {"x": FloatDistribution(5, 6), "y": FloatDistribution(5, 6)}

    def sample_relative(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any]:
        return {"x": 5.5, "y": 5.5}

    def sample_independent(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return param_distribution.low  # type: ignore[attr-defined]  # floats only, here


def study_and_space(trial: optuna.Trial) -> float:
    """What a trial reads of its study (metric names, sampler, pruner) and of its relative
    search space, before and after its first suggestion."""
    before = trial.relative_search_space
    x = trial.suggest_float("x", 0, 100)  # in the relative space
    w = trial.suggest_float("w", 0, 100)  # not in it: sampled independently
    after = trial.relative_search_space
    study = trial.study
    samplers = (RelativeSampler, optuna.samplers.BaseSampler, optuna.samplers.TPESampler)
    pruners = (optuna.pruners.MedianPruner, optuna.pruners.BasePruner, optuna.pruners.NopPruner)
    trial.set_user_attr(
        "seen",
        {
            "before": before,
            "after": None if after is None else {k: str(d) for k, d in sorted(after.items())},
            "relative_params": trial.relative_params,
            "x": x,
            "w": w,
            "metric_names": study.metric_names,
            "sampler": study.sampler.__class__.__name__,
            "sampler_is": [isinstance(study.sampler, c) for c in samplers],
            "pruner": study.pruner.__class__.__name__,
            "pruner_is": [isinstance(study.pruner, c) for c in pruners],
        },
    )
    return x + w
