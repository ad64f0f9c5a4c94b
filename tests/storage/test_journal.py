"""The broker's journal file (`optuna_rq.storage.journal_file`): Optuna's format, read back by
Optuna's own `JournalFileBackend`, durable at `flush` and only then, safe beside other writers that
follow Optuna's lock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from optuna_rq.storage.guarded_storages import Storages
from optuna_rq.storage.journal_file import BatchedJournal
from optuna_rq.storage.storage_policy import StoragePolicy

pytestmark = pytest.mark.timeout(60)


def _study(journal: BatchedJournal, name: str = "s") -> optuna.Study:
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
    journal = BatchedJournal(path)
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
    journal = BatchedJournal(path)
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
    journal = BatchedJournal(path)
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
    first = BatchedJournal(path)
    _run(_study(first), 3)
    first.flush()
    _run(_study(first), 2)  # told, never flushed: a crash loses these, and nobody was told
    first.close()

    second = BatchedJournal(path)
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
    first = BatchedJournal(path)
    _run(_study(first), 2)
    first.flush()
    first.close()
    with open(path, "ab") as file:
        file.write(b'{"op_code":4,"worker_id":"x","study_id":0,"dat')  # a write cut short

    journal = BatchedJournal(path)
    study = _study(journal)
    assert len(study.trials) == 2
    _run(study, 1)
    journal.flush()
    assert [t.state for t in _read(path)] == [TrialState.COMPLETE] * 3
    journal.close()


def test_two_batched_journals_on_one_file_interleave_as_optunas_writers_do(tmp_path: Path) -> None:
    path = tmp_path / "studies.journal"
    first, second = BatchedJournal(path), BatchedJournal(path)
    one = _study(first, "one")
    first.flush()  # the lock is held until then: a second writer waits for it
    two = _study(second, "two")
    second.flush()
    for _ in range(3):  # turn by turn, as two brokers' loops would
        _run(one, 2)
        first.flush()
        _run(two, 1)
        second.flush()
    # Each sees the other's study, and a fresh reader sees both exactly as their writers do.
    assert _view(_read(path, "one")) == _view(one.get_trials(deepcopy=False))
    assert _view(_read(path, "two")) == _view(two.get_trials(deepcopy=False))
    assert len(optuna.load_study(study_name="two", storage=JournalStorage(first)).trials) == 3
    first.close()
    second.close()


def test_a_plain_optuna_writer_beside_it_waits_for_the_flush_and_both_are_kept(
    tmp_path: Path,
) -> None:
    path = tmp_path / "studies.journal"
    journal = BatchedJournal(path)
    study = _study(journal)
    _run(study, 1)  # buffered: the journal holds Optuna's lock until it flushes
    done = threading.Event()

    def notebook() -> None:  # a user's process, writing the same file as Optuna does
        other = optuna.create_study(
            study_name="s",
            storage=JournalStorage(JournalFileBackend(str(path))),
            load_if_exists=True,
        )
        other.enqueue_trial({"x": 0.5})
        done.set()

    writer = threading.Thread(target=notebook)
    writer.start()
    assert not done.wait(0.3), "wrote while the journal held Optuna's lock"
    journal.flush()
    writer.join(timeout=30)
    assert done.is_set()
    _run(study, 1)  # the enqueued trial is read in, and runs first, as in Optuna
    journal.flush()
    read = _read(path)
    assert _view(read) == _view(study.get_trials(deepcopy=False))
    assert [t.params["x"] for t in read][1] == 0.5
    journal.close()


def test_the_daemons_storages_flush_journals_and_release_them_when_forgotten(
    tmp_path: Path,
) -> None:
    url = f"journal:///{tmp_path / 'studies.journal'}"
    storages = Storages(policy=StoragePolicy(url))
    study = optuna.create_study(study_name="s", storage=storages.open(url))
    _run(study, 2)
    assert (tmp_path / "studies.journal").stat().st_size == 0
    storages.flush()
    assert len(_read(tmp_path / "studies.journal")) == 2

    # Another spelling of the same file is the same storage (not a second journal on it).
    assert storages.open(f"journal:///{tmp_path}/./studies.journal") is storages.open(url)
    storages.forget(url)  # a failed storage: its file is released, and opens afresh
    again = Storages(policy=StoragePolicy(url))
    assert len(optuna.load_study(study_name="s", storage=again.open(url)).trials) == 2
    again.close()


@pytest.mark.processes
def test_the_lock_of_a_broker_that_died_holding_it_is_released_at_once(tmp_path: Path) -> None:
    path = tmp_path / "studies.journal"
    # A broker SIGKILLed in a turn, with changes buffered: it dies holding Optuna's lock.
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys, optuna\n"
            "from optuna.storages import JournalStorage\n"
            "from optuna_rq.storage.journal_file import BatchedJournal\n"
            "journal = BatchedJournal(sys.argv[1])\n"
            "optuna.create_study(study_name='s', storage=JournalStorage(journal))\n"
            "journal.flush()\n"
            "optuna.load_study(study_name='s', storage=JournalStorage(journal)).ask()\n"
            "os.kill(os.getpid(), 9)\n",
            str(path),
        ],
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL
    assert os.path.islink(f"{path}.lock")  # left behind
    # Optuna's own writers would wait out their grace period (or, before Optuna 4.1, for
    # ever); the next broker releases it at once, and its study is as the dead one flushed it.
    journal = BatchedJournal(path)
    study = _study(journal)
    assert study.trials == []  # the ask was never flushed, so never acknowledged
    _run(study, 1)
    journal.flush()
    assert len(_read(path)) == 1
    journal.close()
    assert not os.path.lexists(f"{path}.lock")
    assert [p.name for p in tmp_path.iterdir()] == ["studies.journal"]  # no holder files left


def test_waiting_trials_are_found_as_a_walk_of_the_history_finds_them(tmp_path: Path) -> None:
    """`study.ask()` takes enqueued trials first. The daemon's journal storage finds them without
    a walk over every trial, and finds the same ones a walk does (Optuna's JournalStorage, asked
    the same), oldest first, through asks, enqueues, trials taken by another writer of the file,
    and a trial set WAITING again."""
    path = tmp_path / "studies.journal"
    url = f"journal:///{path}"
    storages = Storages(policy=StoragePolicy(url))
    storage = storages.open(url)
    study = optuna.create_study(study_name="s", storage=storage)
    sid = study._study_id

    def waiting() -> list[int]:
        found = [t.number for t in storage.get_all_trials(sid, False, (TrialState.WAITING,))]
        walked = storage.inner.get_all_trials(sid, deepcopy=False, states=(TrialState.WAITING,))
        assert found == [t.number for t in walked]
        assert [t.number for t in study.get_trials(states=(TrialState.WAITING,))] == found
        return found

    _run(study, 3)
    assert waiting() == []
    study.enqueue_trial({"x": 0.1})
    study.enqueue_trial({"x": 0.2})
    assert waiting() == [3, 4]
    _run(study, 1)  # takes trial 3, the oldest waiting
    assert study.trials[3].state is TrialState.COMPLETE and waiting() == [4]
    study.enqueue_trial({"x": 0.3})
    assert waiting() == [4, 5]
    storages.flush()  # another process's writes to the file are read in
    other = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(path))))
    other.enqueue_trial({"x": 0.4})
    taken = other.ask()  # the other writer takes trial 4
    assert taken.number == 4
    assert waiting() == [5, 6]
    other.tell(taken, 1.0)
    running = study.ask()
    assert waiting() == [6]
    # Set WAITING again through the storage (Optuna itself never does): it is found again.
    storage.set_trial_state_values(running._trial_id, TrialState.WAITING)
    assert running.number in waiting()
    copied = storage.get_all_trials(sid, True, (TrialState.WAITING,))  # copies, when asked
    assert [(t.number, t.system_attrs) for t in copied] == [
        (t.number, t.system_attrs) for t in study.get_trials(states=(TrialState.WAITING,))
    ]
    storages.close()
