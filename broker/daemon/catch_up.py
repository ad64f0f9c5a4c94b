"""Publishing the trials of studies that ended before a broker published trials.

A study that runs is published as it goes (`dispatch.publication`), and caught up whenever it is
taken over (`run_opening.open_run`). A study that ended under a broker that did not publish
trials (an older optuna-rq), or that ended while its last trials' entries were lost with Redis,
is never taken over again: the broker catches each of those up once, after it starts, a study a
turn, from its storage, when it finds fewer trials published than its status counts.

Nothing here fails a study or stops the broker: a storage it may not open or cannot read is
logged, and `optuna-rq trials NAME --storage URL` reads it wherever it can be reached.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import optuna
import redis

from optuna_rq.dispatch.boundary import passes_through
from optuna_rq.dispatch.publication import TrialPublication
from optuna_rq.errors import ProtocolError, StudyStorageError
from optuna_rq.protocol import Keys, Signer, StudySpec
from optuna_rq.protocol.status import read_status
from optuna_rq.storage.guarded_storages import Storages

__all__ = ["CatchUp"]

log = logging.getLogger("optuna_rq.broker")


class CatchUp:
    """The ended studies whose trials may be unpublished, caught up one a turn (`step`)."""

    def __init__(
        self,
        connection: redis.Redis,
        keys: Keys,
        signer: Signer,
        *,
        storages: Storages,
        publication: TrialPublication,
        storage_url: Callable[[StudySpec], str],
    ) -> None:
        self.connection = connection
        self.keys = keys
        self.signer = signer
        self.storages = storages
        self.publication = publication
        self.storage_url = storage_url
        self.waiting: list[StudySpec] = []

    def add(self, specs: list[StudySpec]) -> None:
        self.waiting += specs

    def step(self) -> None:
        """Catch up the next study waiting, if its published trials fall short of its status."""
        if not self.waiting:
            return
        spec = self.waiting[0]
        try:
            self._catch_up(spec)
        except Exception as exc:
            if passes_through(exc) and not isinstance(exc, StudyStorageError):
                raise  # the broker's own Redis, or its lock: tried again on the next turn
            log.warning(
                "study %r: its trials are not published (`optuna-rq trials %s --storage URL` "
                "reads them from its storage): %s",
                *(spec.name, spec.name, exc),
            )
        self.waiting.pop(0)

    def _catch_up(self, spec: StudySpec) -> None:
        try:
            status = read_status(self.connection, self.keys, self.signer, spec.name)
        except ProtocolError:
            return  # not the broker's: nothing says how many it has (counted where it is read)
        if status is None or not status.state.ended:
            return  # deleted, or running again (taken over, and published, by then)
        published = int(self.connection.hlen(self.keys.trials_of(spec.name)))
        if published >= status.complete + status.pruned + status.failed:
            return
        url = self.storage_url(spec)
        study = optuna.load_study(
            study_name=spec.name,
            storage=self.storages.open(url),
            sampler=optuna.samplers.RandomSampler(),  # nothing is sampled: the cheapest to make
        )
        self.publication.reconcile(self.connection, study)
