"""The broker's journal file (`optuna_rq.journal`): Optuna's format, read back by Optuna's own
`JournalFileBackend`, durable at `flush` and only then, one writer at a time."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from optuna_rq.daemon.storages import Storages
from optuna_rq.errors import JournalConflictError, StudyStorageError
from optuna_rq.journal import SoleWriterJournal

pytestmark = pytest.mark.timeout(60)


def _study(journal: SoleWriterJournal, name: str = "s") -> optuna.Study:
    return optuna.create_study(
        study_name=name,
        storage=JournalStorage(journal),
        sampler=optuna.samplers.RandomSampler(seed=1),
        load_if_exists=True,
    )


def _run(study: optuna.Study, n: int) -> None:
    for _ in range(n):
        trial = study.ask()
        x = trial.suggest_float("x", 0, 1)
        trial.set_user_attr("pair", (1, "a"))
        trial.report(x, step=0)
        study.tell(trial, x * x)


def _read(path: Path, name: str = "s") -> list[optuna.trial.FrozenTrial]:
    """The study as a fresh Optuna reader sees it in the file."""
    storage = JournalStorage(JournalFileBackend(str(path)))
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def _view(trials: list[optuna.trial.FrozenTrial]) -> list[tuple[object, ...]]:
    return [
        (t.number, t.state, t.values, t.params, t.user_attrs, t.intermediate_values) for t in trials
    ]


def test_optunas_own_reader_reads_back_what_the_journal_flushed(tmp_path: Path) -> None:
    path = tmp_path / "studies.journal"
    journal = SoleWriterJournal(path)
    study = _study(journal)
    _run(study, 5)
    assert journal.flush() > 0

    read = _read(path)
    assert len(read) == 5 and all(t.state is TrialState.COMPLETE for t in read)
    assert _view(read) == _view(study.get_trials(deepcopy=False))
    # What the broker holds is what it would hold read back from the file: a tuple is a list.
    assert study.trials[0].user_attrs["pair"] == [1, "a"]
    assert path.read_bytes().endswith(b"\n")
    journal.close()


def test_nothing_reaches_the_file_before_a_flush(tmp_path: Path) -> None:
    path = tmp_path / "studies.journal"
    journal = SoleWriterJournal(path)
    study = _study(journal)
    journal.flush()
    size = path.stat().st_size
    _run(study, 3)
    assert path.stat().st_size == size and journal.pending > 0
    assert _read(path) == []
    journal.flush()
    assert journal.pending == 0 and len(_read(path)) == 3
    journal.close()


def test_a_flush_with_nothing_buffered_touches_nothing(tmp_path: Path) -> None:
    path = tmp_path / "studies.journal"
    journal = SoleWriterJournal(path)
    _run(_study(journal), 1)
    journal.flush()
    # Optuna's lock held by another process: a flush that had to write would wait for it.
    lock = Path(f"{path}.lock")
    os.symlink(path, lock)
    try:
        assert journal.flush() == 0
    finally:
        lock.unlink()
    journal.close()


def test_a_reopened_journal_goes_on_where_the_file_ends(tmp_path: Path) -> None:
    path = tmp_path / "studies.journal"
    first = SoleWriterJournal(path)
    _run(_study(first), 3)
    first.flush()
    _run(_study(first), 2)  # told, never flushed: a crash loses these, and nobody was told
    first.close()

    second = SoleWriterJournal(path)
    study = _study(second)
    assert len(study.trials) == 3
    _run(study, 4)
    second.flush()
    read = _read(path)
    assert [t.number for t in read] == list(range(7))
    assert _view(read) == _view(study.get_trials(deepcopy=False))
    second.close()


def test_a_torn_last_line_is_cut_off_and_the_file_stays_readable(tmp_path: Path) -> None:
    path = tmp_path / "studies.journal"
    first = SoleWriterJournal(path)
    _run(_study(first), 2)
    first.flush()
    first.close()
    with open(path, "ab") as file:
        file.write(b'{"op_code":4,"worker_id":"x","study_id":0,"dat')  # a write cut short

    journal = SoleWriterJournal(path)
    study = _study(journal)
    assert len(study.trials) == 2
    _run(study, 1)
    journal.flush()
    assert [t.state for t in _read(path)] == [TrialState.COMPLETE] * 3
    journal.close()


def test_a_second_sole_writer_is_refused_until_the_first_closes(tmp_path: Path) -> None:
    path = tmp_path / "studies.journal"
    first = SoleWriterJournal(path)
    with pytest.raises(JournalConflictError, match="open in another broker"):
        SoleWriterJournal(path)
    first.close()
    SoleWriterJournal(path).close()


def test_a_plain_optuna_writer_beside_it_fails_the_flush_and_adds_nothing(tmp_path: Path) -> None:
    path = tmp_path / "studies.journal"
    journal = SoleWriterJournal(path)
    study = _study(journal)
    journal.flush()
    other = optuna.create_study(
        study_name="other", storage=JournalStorage(JournalFileBackend(str(path)))
    )
    other.enqueue_trial({"x": 0.5})
    written = path.read_bytes()
    _run(study, 1)
    with pytest.raises(JournalConflictError, match="another process wrote to it"):
        journal.flush()
    assert path.read_bytes() == written
    journal.close()


def test_the_daemons_storages_flush_journals_and_release_them_when_forgotten(
    tmp_path: Path,
) -> None:
    url = f"journal:///{tmp_path / 'studies.journal'}"
    storages = Storages()
    study = optuna.create_study(study_name="s", storage=storages.open(url))
    _run(study, 2)
    assert (tmp_path / "studies.journal").stat().st_size == 0
    storages.flush()
    assert len(_read(tmp_path / "studies.journal")) == 2

    with pytest.raises(StudyStorageError, match="open in another broker"):
        Storages().open(url)
    storages.forget(url)  # a failed storage: its file is released, and opens afresh
    again = Storages()
    assert len(optuna.load_study(study_name="s", storage=again.open(url)).trials) == 2
    again.close()
