"""The broker's side of `optuna-rq enqueue`: parameter sets stored as WAITING trials of a running
study, a slice at a time (a `backlog.BulkKind`), each unless the study has it already.

`study.ask()` takes WAITING trials before it samples, so the sets run next and count against the
budget as any trial does. A set is skipped as Optuna's `enqueue_trial(skip_if_exists=True)`
skips it (a set already enqueued or run), but found in an index of the study's sets
(`param_sets`) rather than a walk over every trial for every set: n sets cost O(n) plus one read
of the study's trials. The skip also makes a slice applied twice (a broker that died after
storing it and before its cursor moved) store nothing twice.

While some of its sets are not stored yet, the study asks only as many trials as it has sets
stored and not yet taken: the sets still run before any sampled trial, as they did when a
command was applied whole.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optuna.trial import TrialState

from optuna_rq.daemon.param_sets import ParamSetIndex
from optuna_rq.dispatch import StudyRun
from optuna_rq.protocol import Command, Enqueue

__all__ = ["EnqueueSets"]

log = logging.getLogger("optuna_rq.broker")


@dataclass(slots=True, kw_only=True)
class _Storing:
    """One study whose sets are being stored."""

    run: StudyRun
    index: ParamSetIndex
    asked_before: int  # the run's asks when its first set was stored: those after take sets
    stored: int = 0
    skipped: int = 0
    refused: int = 0


class EnqueueSets:
    """The `Enqueue` command's kind of pending work, over the daemon's running studies."""

    what = "parameter sets"

    def __init__(self, runs: Mapping[str, StudyRun]) -> None:
        self.runs = runs
        self._storing: dict[str, _Storing] = {}

    # -- BulkKind ------------------------------------------------------------------------------

    def accepts(self, study: str) -> bool:
        return study in self.runs

    def items(self, command: Command) -> Sequence[dict[str, Any]]:
        assert isinstance(command, Enqueue)
        return command.params

    def apply(
        self, study: str, items: Sequence[Any], start: int, deadline: float, tally: Counter[str]
    ) -> int:
        storing = self._of(study)
        index = storing.index
        if not index.catch_up(deadline):
            return start  # the study's trials are still being read
        index.refresh()
        position = start
        while position < len(items):
            params = items[position]
            position += 1
            if index.holds(params):
                storing.skipped += 1
                tally["existing"] += 1
            else:
                try:
                    storing.run.study.enqueue_trial(params)
                except (TypeError, ValueError) as exc:  # e.g. a value the storage cannot hold
                    log.error("study %r: parameter set %d refused: %s", study, position - 1, exc)
                    storing.refused += 1
                    tally["refused"] += 1
                else:
                    storing.stored += 1
                    tally["new"] += 1
                    index.catch_up()  # the trial just stored: a repeat later in the slice
            if time.perf_counter() >= deadline:
                break
        if storing.run.journal is not None:
            # The journal storage's index of WAITING trials reads the trials created since its
            # last look: now, a slice at a time, not all at once in the study's next ask.
            storing.run.study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        return position

    def hold(self, study: str) -> None:
        run = self.runs.get(study)
        if run is None:
            return
        storing = self._of(study)
        stored_not_taken = storing.stored - (run.budget.asked - storing.asked_before)
        held = run.n_outstanding + run.sampling
        # No slot at all while none is stored: not even one asked ahead, which would sample.
        run.grant(min(run.limit, held + stored_not_taken) if stored_not_taken > 0 else 0)

    def end(self, study: str) -> None:
        storing = self._storing.pop(study, None)
        if storing is None:
            return
        refused = f", {storing.refused} refused" if storing.refused else ""
        log.info(
            "study %r: enqueued %d parameter sets (%d already there%s)",
            study,
            storing.stored,
            storing.skipped,
            refused,
        )

    def _of(self, study: str) -> _Storing:
        run = self.runs[study]
        storing = self._storing.get(study)
        if storing is None or storing.run is not run:  # a study started afresh: read it again
            storing = _Storing(
                run=run, index=ParamSetIndex(run.study), asked_before=run.budget.asked
            )
            self._storing[study] = storing
        return storing
