"""Every per-attempt name `Keys` makes (a job id, a lease, a cancel mark, a reply list) carries
the study and its incarnation: no two attempts, of two studies or of two incarnations of one
study name, ever share one.

The names are found by enumerating `Keys`: every method that takes an `AttemptId` is one, and no
method may take an attempt's parts any other way. So a per-attempt key added later is checked
here without being listed, and one that forgets the incarnation fails."""

from __future__ import annotations

import inspect
import itertools
import typing
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from optuna_rq.errors import ConfigError
from optuna_rq.protocol import AttemptId, Keys, new_incarnation
from optuna_rq.protocol.keys import INCARNATION_PATTERN

Name = Callable[[AttemptId], str]

KEYS = Keys("optuna-rq")
FIELDS = ("reply_to", "study", "incarnation", "trial_number", "attempt")
# An attempt's parts: a method taking one of these by name makes a per-attempt name outside
# the rule (it must take an AttemptId). A name of a whole study (its backlog of bulk commands,
# which goes when the study ends; its published trials, of every run of it in its storage, which
# go when it is deleted; those a remote Optimizer publishes of the study it runs) may take the
# study alone.
_ATTEMPT_PARTS = {"incarnation", "trial_number", "number", "attempt", "job_id"}
_PER_STUDY = {"backlog_of", "trials_of", "driven_trials_of"}


def _methods() -> dict[str, Callable[..., object]]:
    found = {}
    for name, member in vars(Keys).items():
        function = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
        if not name.startswith("__") and inspect.isfunction(function):
            found[name] = function
    return found


def per_attempt_names() -> dict[str, Name]:
    """Every method of `Keys` that names something from an `AttemptId`."""
    names = {}
    for name, function in _methods().items():
        if AttemptId in typing.get_type_hints(function).values():
            names[name] = getattr(KEYS, name)
    return names


def shared(names: dict[str, Name], attempts: Iterable[AttemptId]) -> list[tuple[str, ...]]:
    """The names two (method, attempt) pairs share: empty when every name is its own."""
    owner: dict[str, tuple[str, AttemptId]] = {}
    clashes = []
    for (method, name), attempt in itertools.product(names.items(), attempts):
        made = name(attempt)
        if made in owner and owner[made] != (method, attempt):
            clashes.append((made, repr(owner[made]), repr((method, attempt))))
        owner.setdefault(made, (method, attempt))
    return clashes


def attempts_of(studies: Iterable[str], incarnations: Iterable[str]) -> list[AttemptId]:
    return [
        AttemptId(reply_to=r, study=s, incarnation=i, trial_number=t, attempt=a)
        for r, s, i, t, a in itertools.product(
            ("optuna-rq:results", "optuna-rq:results:0f3a", "other:results"),
            studies,
            incarnations,
            (0, 1, 11),
            (1, 2, 11),
        )
    ]


def test_the_per_attempt_names_are_found_by_enumerating_keys() -> None:
    assert {"job_id", "lease", "cancel", "reply_list"} <= set(per_attempt_names())


def test_no_name_takes_an_attempts_parts_but_through_an_attempt_id() -> None:
    for name, function in _methods().items():
        parts = _ATTEMPT_PARTS if name in _PER_STUDY else _ATTEMPT_PARTS | {"study"}
        taken = set(inspect.signature(function).parameters) & parts
        assert not taken, f"Keys.{name} takes {taken}: name an attempt from one AttemptId"


def test_two_studies_and_two_incarnations_of_one_name_never_share_a_name() -> None:
    incarnations = [new_incarnation(), new_incarnation()]
    attempts = attempts_of(["train", "train-0", "train:0", "trai", "n 0"], incarnations)
    assert shared(per_attempt_names(), attempts) == []


def test_a_name_that_forgets_the_incarnation_is_caught() -> None:
    forgetful = {"lease": lambda of: f"{of.reply_to}:lease:{of.study}-{of.trial_number}"}
    assert shared(forgetful, attempts_of(["train"], [new_incarnation(), new_incarnation()]))


@st.composite
def attempt_pairs(draw: st.DrawFn) -> tuple[AttemptId, AttemptId]:
    """An attempt and another that differs from it in at least one part."""
    parts = {
        "reply_to": st.sampled_from(["p:results", "p:results:0a1b", "q:results", "p:q:results"]),
        "study": st.text(min_size=1, max_size=12),
        "incarnation": st.from_regex(INCARNATION_PATTERN, fullmatch=True),
        "trial_number": st.integers(0, 10**6),
        "attempt": st.integers(1, 100),
    }
    first = {name: draw(strategy) for name, strategy in parts.items()}
    changed = draw(st.sets(st.sampled_from(FIELDS), min_size=1))
    second = dict(first)
    for name in changed:
        second[name] = draw(parts[name].filter(lambda value, n=name: value != first[n]))
    return AttemptId(**first), AttemptId(**second)


@given(attempt_pairs())
def test_any_two_attempts_have_no_name_in_common(pair: tuple[AttemptId, AttemptId]) -> None:
    names = per_attempt_names()
    first = {name(pair[0]) for name in names.values()}
    second = {name(pair[1]) for name in names.values()}
    assert len(first) == len(second) == len(names)  # a lease is never a cancel mark, say
    assert not first & second, pair


@pytest.mark.parametrize("incarnation", ["", "0123456789AB", "0123456789a", "0123456789ab:0", 7])
def test_an_attempt_id_takes_only_an_incarnation_id(incarnation: object) -> None:
    with pytest.raises(ConfigError, match="12 lowercase hex digits"):
        AttemptId(
            reply_to="p:results",
            study="s",
            incarnation=incarnation,  # type: ignore[arg-type]
            trial_number=0,
            attempt=1,
        )


@given(
    st.sampled_from(["p:results", "p:q:results"]),
    st.text(min_size=1, max_size=12),
    st.from_regex(INCARNATION_PATTERN, fullmatch=True),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 100)), min_size=1, max_size=32),
)
def test_a_batch_job_id_names_the_job_id_of_every_attempt_it_carries(
    reply_to: str, study: str, incarnation: str, members: list[tuple[int, int]]
) -> None:
    attempts = [
        AttemptId(
            reply_to=reply_to, study=study, incarnation=incarnation, trial_number=t, attempt=a
        )
        for t, a in members
    ]
    batch = Keys.batch_job_id(attempts)
    assert Keys.carried(batch) == [Keys.job_id(a) for a in attempts]
    if len(attempts) == 1:
        assert batch == Keys.job_id(attempts[0])  # a batch of one is the attempt's own job
    else:
        assert all(batch != Keys.job_id(a) for a in attempts)


def test_a_batch_carries_attempts_of_one_incarnation_of_one_study() -> None:
    first, other_study, other_incarnation = (
        AttemptId(reply_to="p:results", study=s, incarnation=i, trial_number=n, attempt=1)
        for s, i, n in (("s", "0" * 12, 0), ("t", "0" * 12, 1), ("s", "1" * 12, 1))
    )
    for other in (other_study, other_incarnation):
        with pytest.raises(ValueError, match="one incarnation of one study"):
            Keys.batch_job_id([first, other])
