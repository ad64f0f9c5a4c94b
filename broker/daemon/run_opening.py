"""How the broker opens a study it starts or takes over: its Optuna study in its storage, made
with the sampler and pruner its spec names, and its run, holding the trials a previous broker left
in flight."""

from __future__ import annotations

import optuna
import redis
from optuna.trial import TrialState

from optuna_rq.dispatch import Budget, Dispatcher, RunSpec, StudyRun
from optuna_rq.errors import ConfigError
from optuna_rq.protocol import FailReason, StudySpec
from optuna_rq.storage.guarded_storages import Storages
from optuna_rq.storage.storage_access import journal_path
from optuna_rq.storage.stored_definitions import record_definition
from optuna_rq.study.algorithms import make_pruner, make_sampler

__all__ = ["open_run"]


def open_run(
    spec: StudySpec, storages: Storages, url: str, dispatcher: Dispatcher, connection: redis.Redis
) -> StudyRun:
    """The run of `spec`'s study in the storage at `url` (created there, or loaded): its trials
    still RUNNING are in flight again (`StudyRun.reattach`), and what a stopped broker reported
    and did not publish is published through `dispatcher`'s publication."""
    study = optuna.create_study(
        storage=storages.open(url),
        study_name=spec.name,
        directions=spec.direction_names,  # type: ignore[arg-type]  # checked by StudySpec
        sampler=make_sampler(spec.sampler, spec.seed, constant_liar=spec.uses_constant_liar),
        pruner=make_pruner(spec.pruner),
        load_if_exists=True,
    )
    if [d.name.lower() for d in study.directions] != spec.direction_names:
        raise ConfigError(
            f"study {spec.name!r} exists with directions "
            f"{[d.name.lower() for d in study.directions]}, not {spec.direction_names}"
        )
    record_definition(study, spec)  # its trials are this definition's (`stored_definitions`)
    journal = journal_path(url)
    run = StudyRun(
        study=study,
        spec=RunSpec.of(spec),  # stored: on_submit gave it its incarnation
        budget=Budget(spec.n_trials),
        journal=None if journal is None else str(journal),
    )
    lost = run.reattach()
    if lost:  # its retry had started before the last broker failed it
        dispatcher.observer.ended(
            spec.name, TrialState.FAIL.name, FailReason.WORKER_LOST, count=lost
        )
    # What a stopped broker recorded and did not publish, or a study from before trials were
    # published: published now, once durable (reattach may have failed a trial).
    storages.flush()
    dispatcher.publication.reconcile(connection, study)
    return run
