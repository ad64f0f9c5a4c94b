"""Search-space declarations validate themselves; process() samples nested inputs by dotted path."""

from __future__ import annotations

import optuna
import pytest

from optuna_rq import Category, ConfigError, Float, Integer, Number, Suggestion, process, suggest


def test_suggest_namespace_builds_the_suggestion_classes() -> None:
    assert suggest.float(low=0.0, high=1.0) == Float(0.0, 1.0, None, False)
    assert suggest.integer(low=1, high=9) == Integer(1, 9, 1, False)
    assert suggest.category(["a", "b"]) == Category(["a", "b"])
    assert isinstance(Float(0, 1), Number) and isinstance(Integer(0, 1), Suggestion)
    assert isinstance(Category([1]), Suggestion) and not isinstance(Category([1]), Number)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Float(1.0, 1.0), "low must be less than high"),
        (lambda: Float(2.0, 1.0), "low must be less than high"),
        (lambda: Integer(5, 1), "low must be less than high"),
        (lambda: Float(0.0, 1.0, step=2.0), "step must be less than the range"),
        (lambda: Integer(0, 3, step=4), "step must be less than the range"),
        (lambda: Integer(0, 3, step=0), "step must be greater than 0"),
        (lambda: Float(0.0, 1.0, log=True), "log-scaled range needs low > 0"),
        (lambda: Float(0.1, 1.0, step=0.1, log=True), "both stepped and log-scaled"),
        (lambda: Integer(1, 100, step=2, log=True), "log-scaled Integer needs step=1"),
        (lambda: Category([]), "at least one choice"),
    ],
)
def test_invalid_suggestions_raise_value_errors_naming_the_values(build, message) -> None:
    with pytest.raises(ValueError, match=message) as info:
        build()
    assert isinstance(info.value, ConfigError)


def test_error_message_quotes_the_offending_values() -> None:
    with pytest.raises(ConfigError, match=r"Integer\(low=5, high=1\)"):
        Integer(5, 1)


def test_process_samples_nested_suggestions_under_dotted_names() -> None:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    inputs = {
        "x": suggest.float(-10, 10),
        "depth": suggest.integer(2, 12, step=2),
        "model": {"lr": suggest.float(1e-5, 1e-1, log=True), "kind": suggest.category(["a", "b"])},
        "seed": 42,
        "tags": ["fixed", "list"],
        "nested_fixed": {"name": "kept"},
    }
    out = process(trial, inputs)

    assert out is inputs  # in place, as the original
    assert set(trial.params) == {"x", "depth", "model.lr", "model.kind"}
    assert out["x"] == trial.params["x"] and -10 <= out["x"] <= 10
    assert out["depth"] in range(2, 13, 2)
    assert out["model"]["lr"] == trial.params["model.lr"] and 1e-5 <= out["model"]["lr"] <= 0.1
    assert out["model"]["kind"] in ("a", "b")
    assert out["seed"] == 42 and out["tags"] == ["fixed", "list"]
    assert out["nested_fixed"] == {"name": "kept"}
    dist = trial.distributions["model.lr"]
    assert isinstance(dist, optuna.distributions.FloatDistribution) and dist.log


def test_process_with_root_prefixes_names() -> None:
    trial = optuna.create_study().ask()
    process(trial, {"lr": suggest.float(0.1, 1.0)}, root=["opt"])
    assert list(trial.params) == ["opt.lr"]


def test_process_passes_step_to_optuna() -> None:
    trial = optuna.create_study().ask()
    out = process(trial, {"q": Float(0.0, 1.0, step=0.25)})
    assert out["q"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert trial.distributions["q"].step == 0.25
