"""What the sampler process samples on: the broker's journal file, read as it grows, with the
trials it samples kept aside (`ScratchStorage`), never written.

The broker is the one writer of its journal; the sampler process only reads it (`JournalReader`:
whole lines, from where it last read, no lock: Optuna's readers take none either). A trial it
samples lives in a scratch copy until the broker creates it for real, from the params handed
back, and flushes it: then the file has it and the scratch copy is dropped (`drop_scratch`, at the
end of each batch of asks; the broker asks for the next batch of a study only after it flushed
this one's trials). So the sampler sees every trial the broker recorded before it asked (a seeded
sampler at cap 1 gives `study.optimize`'s params), the trials of its own batch RUNNING beside
them, and nothing is written twice.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
from collections.abc import Container, Iterator, Sequence
from pathlib import Path
from typing import Any

from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage
from optuna.storages.journal import BaseJournalBackend
from optuna.study import StudyDirection
from optuna.study._frozen import FrozenStudy  # what BaseStorage.get_all_studies returns
from optuna.trial import FrozenTrial, TrialState

from optuna_rq.study.optuna_trials import only_waiting

__all__ = ["JournalReader", "ScratchStorage", "ScratchWriteError"]

_SCRATCH_IDS_FROM = 1 << 62
"""Trial ids of scratch trials: far above any a storage hands out, so none is ever mistaken."""


class ScratchWriteError(RuntimeError):
    """A sampler tried to change what the broker owns (a study, or a trial it did not ask)."""


class JournalReader(BaseJournalBackend):
    """The journal file at `path`, read only: each read takes in the whole lines appended since
    the last one (a line being written waits for the next)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        self._lines: list[bytes] = []
        self._size = 0

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        size = os.fstat(self._fd).st_size
        if size > self._size:
            data = os.pread(self._fd, size - self._size, self._size)
            end = data.rfind(b"\n") + 1
            self._lines += data[:end].split(b"\n")[:-1]
            self._size += end
        return (json.loads(line) for line in self._lines[log_number_from:])

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        raise ScratchWriteError(f"journal {self.path} is read only here (the broker writes it)")

    def close(self) -> None:
        os.close(self._fd)


class ScratchStorage(BaseStorage):
    """`base` to read, and trials created here kept in memory, listed after the base's.

    Only what `study.ask()` and a sampler do to the trial being asked is allowed: create it, set
    its params and attributes. Anything else that writes raises `ScratchWriteError`. WAITING
    trials are never offered (the broker samples a study with enqueued trials itself, so that
    they are taken in order).
    """

    def __init__(self, base: BaseStorage) -> None:
        self.base = base
        self._scratch: dict[int, FrozenTrial] = {}  # trial id -> trial, in creation order
        self._study_of: dict[int, int] = {}  # scratch trial id -> study id
        self._next_id = _SCRATCH_IDS_FROM
        self.last_created = -1
        """The id of the scratch trial created last."""

    # -- the scratch trials ----------------------------------------------------------------------

    def scratch_trial(self, trial_id: int) -> FrozenTrial:
        """A copy of scratch trial `trial_id`, as sampled so far."""
        return copy.deepcopy(self._scratch[trial_id])

    def drop_scratch(self) -> None:
        """Forget every scratch trial: the broker created them (or never will)."""
        self._scratch.clear()
        self._study_of.clear()

    def _own(self, trial_id: int) -> FrozenTrial:
        trial = self._scratch.get(trial_id)
        if trial is None:
            raise ScratchWriteError(
                f"trial {trial_id} is the broker's: a sampler in the sampler process may change "
                "only the trial it samples"
            )
        return trial

    def _scratch_of(self, study_id: int) -> list[FrozenTrial]:
        return [t for i, t in self._scratch.items() if self._study_of[i] == study_id]

    # -- trials ----------------------------------------------------------------------------------

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        if template_trial is not None:
            raise ScratchWriteError("trials with a template are created by the broker")
        trial_id, self._next_id = self._next_id, self._next_id + 1
        number = len(self.base.get_all_trials(study_id, deepcopy=False))
        number += len(self._scratch_of(study_id))
        self._scratch[trial_id] = FrozenTrial(
            number=number,
            state=TrialState.RUNNING,
            value=None,
            values=None,
            datetime_start=datetime.datetime.now(),
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={},
            system_attrs={},
            intermediate_values={},
            trial_id=trial_id,
        )
        self._study_of[trial_id] = study_id
        self.last_created = trial_id
        return trial_id

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: BaseDistribution,
    ) -> None:
        trial = self._own(trial_id)
        trial.params = {
            **trial.params,
            param_name: distribution.to_external_repr(param_value_internal),
        }
        trial.distributions = {**trial.distributions, param_name: distribution}

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        trial = self._own(trial_id)
        trial.user_attrs = {**trial.user_attrs, key: value}

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        trial = self._own(trial_id)
        trial.system_attrs = {**trial.system_attrs, key: value}

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        raise ScratchWriteError(f"only the broker tells trials (trial {trial_id}, {state.name})")

    def set_trial_intermediate_value(self, trial_id: int, step: int, value: float) -> None:
        raise ScratchWriteError(f"only the broker reports for trials (trial {trial_id})")

    def get_trial(self, trial_id: int) -> FrozenTrial:
        if trial_id in self._scratch:
            return self._scratch[trial_id]
        return self.base.get_trial(trial_id)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        for trial_id, trial in self._scratch.items():
            if self._study_of[trial_id] == study_id and trial.number == trial_number:
                return trial_id
        return self.base.get_trial_id_from_study_id_trial_number(study_id, trial_number)

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        if only_waiting(states):
            return []  # what `study.ask()` would take: the broker asks those itself
        trials = self.base.get_all_trials(study_id, deepcopy=False, states=states)
        scratch = [t for t in self._scratch_of(study_id) if states is None or t.state in states]
        trials = [*trials, *scratch]
        return copy.deepcopy(trials) if deepcopy else trials

    # -- studies: read through, never written ------------------------------------------------------

    def create_new_study(
        self, directions: Sequence[StudyDirection], study_name: str | None = None
    ) -> int:
        raise ScratchWriteError("studies are created by the broker")

    def delete_study(self, study_id: int) -> None:
        raise ScratchWriteError("studies are deleted by the broker")

    def set_study_user_attr(self, study_id: int, key: str, value: Any) -> None:
        raise ScratchWriteError(f"study attribute {key!r} is the broker's to set")

    def set_study_system_attr(self, study_id: int, key: str, value: Any) -> None:
        raise ScratchWriteError(f"study attribute {key!r} is the broker's to set")

    def get_study_id_from_name(self, study_name: str) -> int:
        return self.base.get_study_id_from_name(study_name)

    def get_study_name_from_id(self, study_id: int) -> str:
        return self.base.get_study_name_from_id(study_id)

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        return self.base.get_study_directions(study_id)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        return self.base.get_study_user_attrs(study_id)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        return self.base.get_study_system_attrs(study_id)

    def get_all_studies(self) -> list[FrozenStudy]:
        return self.base.get_all_studies()
