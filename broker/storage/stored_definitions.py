"""What a study's Optuna storage remembers of the definition it runs, so that the trials of two
definitions are never mixed in one Optuna study.

While the broker holds a study, another definition under its name is refused at submit
(`StudySpec.differences`). Once it forgets it (`optuna-rq delete` without `--purge`, or a Redis
that lost its keys; or another prefix's broker on the same storage), its trials stay in its
storage, and a submission of the name continues them: what a user wants for the same definition,
and never for another (a `delete` then a resubmission with another objective would otherwise
add its trials to the old ones). So the broker records each study's definition in its Optuna
study (a study system attribute, `DEFINITION_ATTR`) when it starts it, and a submission whose
definition differs from the one recorded fails at once, naming the difference and the way out;
nothing is added to the old study. A study without a record (created by Optuna itself) is
continued, and recorded from then on.

The space is recorded as a digest: a storage's attribute column may be small (MySQL's TEXT holds
64 KiB), and a space may be bigger.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import optuna
from optuna.storages import BaseStorage

from optuna_rq.protocol import StudySpec
from optuna_rq.protocol.spec import DEFINITION
from optuna_rq.study.optuna_trials import set_study_system_attr, study_system_attrs

__all__ = ["DEFINITION_ATTR", "definition_conflict", "record_definition"]

DEFINITION_ATTR = "optuna_rq:definition"
"""The study system attribute holding the definition the broker runs the study with."""

_RECORDED = tuple(name for name in DEFINITION if name != "storage")
"""What is recorded: the definition but its storage (the record is in that storage)."""


def recorded_definition(spec: StudySpec) -> dict[str, Any]:
    """`spec`'s definition as it is recorded: JSON, with the space as a digest."""
    record = {name: getattr(spec, name) for name in _RECORDED if name != "space"}
    record["space"] = _digest(spec.space)
    return record


def definition_conflict(storage: BaseStorage, spec: StudySpec) -> str | None:
    """Why `spec` may not run in `storage`, which holds a study of its name recorded with
    another definition; None if it may (no such study, no record, or the same definition)."""
    try:
        study_id = storage.get_study_id_from_name(spec.name)
    except KeyError:
        return None
    recorded = storage.get_study_system_attrs(study_id).get(DEFINITION_ATTR)
    if not isinstance(recorded, dict):
        return None
    mine = recorded_definition(spec)
    differences = "; ".join(
        "another space" if name == "space" else f"{name} {recorded.get(name)!r}, not {mine[name]!r}"
        for name in _RECORDED
        if recorded.get(name) != mine[name]
    )
    if not differences:
        return None
    name = spec.name
    return (
        f"its storage holds the trials of an earlier study {name!r} of another definition "
        f"({differences}), which the broker no longer holds (deleted without --purge, or "
        "another prefix's); nothing was added to it. Submit it under another --study-name, "
        f"or drop those trials first with `optuna-rq delete {name} --purge`"
    )


def record_definition(study: optuna.Study, spec: StudySpec) -> None:
    """Record `spec`'s definition in `study`, unless a definition is recorded already."""
    if DEFINITION_ATTR not in study_system_attrs(study):
        set_study_system_attr(study, DEFINITION_ATTR, recorded_definition(spec))


def _digest(space: dict[str, Any]) -> str:
    """A digest of `space` that two equal spaces share: numbers that compare equal (`0` and
    `0.0`, as `StudySpec.differences` compares them) are written alike."""
    text = json.dumps(_canonical(space), sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
