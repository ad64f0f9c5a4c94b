"""The daemon's study storages: one per URL, opened on first use, and guarded, so that a storage
that fails is told apart from the daemon's own Redis and fails only the studies on it.

Every call Optuna makes on a study's storage goes through `GuardedStorage`, which turns a
failure of the storage itself (an OSError, a Redis or database error, a journal that does not
parse) into `StudyStorageError` naming the URL. The daemon catches that one class: it fails the
studies on that storage, with the cause in their status, and serves the others. A Redis
`ConnectionError` that reaches the daemon unwrapped is therefore its own Redis's outage.

Optuna's own verdicts on a call (a study not found, a duplicated study, a value the distribution
refuses, a trial already finished) pass through unchanged: Optuna and the dispatcher act on them.

A journal file (the daemon's default storage, or a study's own `journal:///path`) is written
through `BatchedJournal`: replayed from memory (what other writers append is read in), its
changes buffered until `Storages.flush`, which the daemon calls before anything that
acknowledges a change leaves it (a trial sent, a result acknowledged, a call answered, a status
or a command's trim written). Other storages write through at once; their flush is a no-op.

Nothing is opened that the broker's operator did not allow (`optuna_rq.storage.storage_policy`): a
URL comes from the wire, and `Storages` checks its policy before it opens one.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
from collections.abc import Callable, Container
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from optuna_rq.errors import FenceLostError, StudyStorageError
from optuna_rq.plumbing import failpoints
from optuna_rq.plumbing.locations import redact_url
from optuna_rq.storage.journal_file import BatchedJournal
from optuna_rq.storage.storage_access import is_sql, journal_path, open_storage
from optuna_rq.storage.storage_policy import StoragePolicy
from optuna_rq.study.optuna_trials import only_waiting

__all__ = ["GuardedStorage", "Storages", "storage_failure"]

log = logging.getLogger("optuna_rq.broker")


def storage_failure(url: str, exc: BaseException) -> StudyStorageError:
    """The `StudyStorageError` for `exc`, raised by the storage at `url`."""
    if isinstance(exc, StudyStorageError):
        return exc
    return StudyStorageError(url, f"storage {redact_url(url)}: {type(exc).__name__}: {exc}")


def _is_optunas_verdict(exc: Exception) -> bool:
    """Whether `exc` is Optuna answering a call, not the storage failing under it."""
    if isinstance(exc, optuna.exceptions.StorageInternalError):  # a database error, wrapped
        return False
    if isinstance(exc, (json.JSONDecodeError, UnicodeError, pickle.UnpicklingError)):
        return False  # a journal or snapshot that does not parse
    return isinstance(exc, (optuna.exceptions.OptunaError, KeyError, ValueError, TypeError))


def _guarded(name: str, *, writes: bool = False) -> Callable[..., Any]:
    def call(self: GuardedStorage, *args: Any, **kwargs: Any) -> Any:
        if writes and self.journal is None and self.before_write is not None:
            # A storage that writes through (SQL) is durable at once: the fence first (and an
            # SQL storage checks it again in the database as it commits: `sql_fence`).
            self.before_write()
            failpoints.hit("after_fence")
        try:
            return getattr(self.inner, name)(*args, **kwargs)
        except Exception as exc:
            if _is_optunas_verdict(exc) or isinstance(exc, FenceLostError):
                raise
            raise storage_failure(self.url, exc) from exc

    call.__name__ = name
    return call


class _WaitingTrials:
    """The WAITING trials of each study of a storage, found without walking its history.

    `study.ask()` takes a WAITING trial (one enqueued) before it samples, and looks for them
    with `get_all_trials(states=(WAITING,))`: on Optuna's JournalStorage, a walk over every
    trial of the study in Python, on every ask: a cost that grows with the study, and a large share
    of a busy broker's time. A trial is WAITING from its creation until it is taken, never again
    (Optuna's InMemoryStorage finds them on the same premise; one set so through this storage
    is listed anyway), so per study this keeps how many trials it has looked at and which of
    those were waiting, as read: a query looks only at the trials created since (by anyone: the
    storage reads others' appends). A listed trial is read again when this storage writes to it
    (`changed`: taken by an ask, say), and every one is when another writer appended to the
    journal since the last query; else reading them all again on every ask would cost as much
    as the walk, and more with many sets enqueued.
    """

    def __init__(self, storage: BaseStorage, journal: BatchedJournal) -> None:
        self._storage = storage
        self._journal = journal
        self._seen: dict[int, int] = {}  # study id -> trials looked at (numbers 0..n-1)
        # study id -> trial id -> the trial as last read, WAITING, oldest first
        self._listed: dict[int, dict[int, FrozenTrial]] = {}
        self._others: dict[int, int] = {}  # study id -> others' lines read when last checked

    def of(self, study_id: int) -> list[FrozenTrial]:
        """The study's WAITING trials, oldest first, as `get_all_trials` gives them."""
        storage, listed = self._storage, self._listed.setdefault(study_id, {})
        number = self._seen.get(study_id, 0)
        while True:
            try:
                trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
            except KeyError:
                break
            trial = storage.get_trial(trial_id)
            if trial.state is TrialState.WAITING:
                listed[trial_id] = trial
            number += 1
        self._seen[study_id] = number
        others = self._journal.others_read  # after the reads above took in what others wrote
        if self._others.get(study_id) != others:  # another writer may have taken some
            fresh = {trial_id: storage.get_trial(trial_id) for trial_id in listed}
            listed = {i: t for i, t in fresh.items() if t.state is TrialState.WAITING}
            self._listed[study_id] = listed
            self._others[study_id] = others
        return list(listed.values())

    def changed(self, trial_id: int) -> None:
        """This storage wrote to trial `trial_id`: read it again if it is listed."""
        for listed in self._listed.values():
            if trial_id in listed:
                trial = self._storage.get_trial(trial_id)
                if trial.state is TrialState.WAITING:
                    listed[trial_id] = trial
                else:
                    del listed[trial_id]

    def set_waiting(self, trial_id: int) -> None:
        """Trial `trial_id` was set WAITING after it was created: list it."""
        trial = self._storage.get_trial(trial_id)
        for study_id, listed in self._listed.items():
            if trial_id in listed or self._seen.get(study_id, 0) <= trial.number:
                continue  # listed already, or not looked at yet (it is, when it is)
            if self._storage.get_trial_id_from_study_id_trial_number(study_id, trial.number) == (
                trial_id
            ):
                listed[trial_id] = trial
                ordered = sorted(listed.items(), key=lambda item: item[1].number)
                self._listed[study_id] = dict(ordered)

    def forget(self, study_id: int) -> None:
        self._seen.pop(study_id, None)
        self._listed.pop(study_id, None)
        self._others.pop(study_id, None)


class GuardedStorage(BaseStorage):
    """`inner`, with every failure of the storage itself raised as `StudyStorageError`;
    `journal`, if `inner` writes through one, holds its changes until `flush`; a study's
    WAITING trials on it are then found without walking its history (`_WaitingTrials`)."""

    def __init__(
        self,
        inner: BaseStorage,
        url: str,
        journal: BatchedJournal | None = None,
        before_write: Callable[[], None] | None = None,
    ) -> None:
        self.inner = inner
        self.url = url
        self.journal = journal
        self.before_write = before_write
        """Run before each write of a storage that writes through (the broker's fence); a
        journal's writes are fenced where they become durable (`Storages.flush`)."""
        self._waiting = _WaitingTrials(inner, journal) if journal is not None else None

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        try:
            if self._waiting is not None and only_waiting(states):
                trials = self._waiting.of(study_id)
                return copy.deepcopy(trials) if deepcopy else trials
            return self.inner.get_all_trials(study_id, deepcopy=deepcopy, states=states)
        except Exception as exc:
            if _is_optunas_verdict(exc):
                raise
            raise storage_failure(self.url, exc) from exc

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        done = _set_trial_state_values(self, trial_id, state, values)
        if done and self._waiting is not None:
            if state is TrialState.WAITING:
                self._waiting.set_waiting(trial_id)
            else:
                self._waiting.changed(trial_id)
        return bool(done)

    def set_trial_param(self, trial_id: int, *args: Any) -> None:
        _set_trial_param(self, trial_id, *args)
        self._changed(trial_id)

    def set_trial_intermediate_value(self, trial_id: int, *args: Any) -> None:
        _set_trial_intermediate_value(self, trial_id, *args)
        self._changed(trial_id)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        _set_trial_user_attr(self, trial_id, key, value)
        self._changed(trial_id)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        _set_trial_system_attr(self, trial_id, key, value)
        self._changed(trial_id)

    def _changed(self, trial_id: int) -> None:
        if self._waiting is not None:
            self._waiting.changed(trial_id)

    def delete_study(self, study_id: int) -> None:
        _delete_study(self, study_id)
        if self._waiting is not None:
            self._waiting.forget(study_id)

    def flush(self) -> int:
        """Make every change made so far durable; how many logs that wrote (0: nothing was
        buffered, and nothing was touched)."""
        if self.journal is None or not self.journal.pending:
            return 0
        try:
            return self.journal.flush()
        except Exception as exc:
            raise storage_failure(self.url, exc) from exc

    def close(self) -> None:
        """Release the storage's file, dropping what was not flushed (a storage that failed)."""
        if self.journal is not None:
            self.journal.close()

    create_new_study = _guarded("create_new_study", writes=True)
    set_study_user_attr = _guarded("set_study_user_attr", writes=True)
    set_study_system_attr = _guarded("set_study_system_attr", writes=True)
    get_study_id_from_name = _guarded("get_study_id_from_name")
    get_study_name_from_id = _guarded("get_study_name_from_id")
    get_study_directions = _guarded("get_study_directions")
    get_study_user_attrs = _guarded("get_study_user_attrs")
    get_study_system_attrs = _guarded("get_study_system_attrs")
    get_all_studies = _guarded("get_all_studies")
    create_new_trial = _guarded("create_new_trial", writes=True)
    get_trial_id_from_study_id_trial_number = _guarded("get_trial_id_from_study_id_trial_number")
    get_trial_number_from_id = _guarded("get_trial_number_from_id")
    get_trial_param = _guarded("get_trial_param")
    get_trial = _guarded("get_trial")
    get_n_trials = _guarded("get_n_trials")
    get_best_trial = _guarded("get_best_trial")
    get_trial_params = _guarded("get_trial_params")
    get_trial_user_attrs = _guarded("get_trial_user_attrs")
    get_trial_system_attrs = _guarded("get_trial_system_attrs")
    remove_session = _guarded("remove_session")
    check_trial_is_updatable = _guarded("check_trial_is_updatable")


_set_trial_state_values = _guarded("set_trial_state_values", writes=True)
_set_trial_param = _guarded("set_trial_param", writes=True)
_set_trial_intermediate_value = _guarded("set_trial_intermediate_value", writes=True)
_set_trial_user_attr = _guarded("set_trial_user_attr", writes=True)
_set_trial_system_attr = _guarded("set_trial_system_attr", writes=True)
_delete_study = _guarded("delete_study", writes=True)


class Storages:
    """The storages of the studies a daemon serves: one per URL, opened on first use, if
    `policy` allows it. A storage that failed is forgotten (and its file released), so the next
    study on its URL opens it afresh."""

    def __init__(
        self, *, policy: StoragePolicy, before_flush: Callable[[], None] | None = None
    ) -> None:
        self.policy = policy
        self._open: dict[str, GuardedStorage] = {}
        self.superseded: set[str] = set()
        """"host:pid" of the brokers this one took the prefix over from: a journal lock one of
        them holds is released at once (`journal_lock.JournalLock`)."""
        self.before_flush = before_flush
        """Run before anything is made durable (the broker's fence: a broker that lost its lock
        or its epoch makes nothing durable); raises to stop it. A journal's changes become
        durable at `flush`, a storage that writes through (SQL) at each write."""
        self.writer: tuple[str, str, int] | None = None
        """The prefix, Redis epoch and lock generation of the broker writing, once it holds its
        lock: what SQL storages keep its fence by (`sql_fence`)."""

    def open(self, url: str) -> GuardedStorage:
        """The storage at `url`; raises StorageNotAllowedError (nothing opened) if the policy
        does not allow it, StudyStorageError if it cannot be opened, whatever the reason (a
        path that cannot be created, a server that is down)."""
        key = _identity(url)
        storage = self._open.get(key)
        if storage is None:
            self.policy.check(url)
            storage = self._open[key] = _open_guarded(url, self.superseded, self.writer)
            storage.before_write = self.before_flush
        return storage

    def read_back(self, url: str, name: str) -> optuna.Study | None:
        """Study `name` as the storage at `url` holds it now, read afresh: the figures a study
        that failed with its storage (a full disk, say) ends with are what it kept, not what the
        broker gave it and it never wrote (a journal's buffer that would not flush). None,
        logged, if it cannot be read either (a server that is down), or may not be opened."""
        try:
            self.policy.check(url)
            return optuna.load_study(study_name=name, storage=open_storage(url))
        except Exception as exc:
            log.warning("study %r: cannot read back what its storage holds: %s", name, exc)
            return None

    def flush(self) -> None:
        """Make every change made to any open storage durable: called before anything that
        acknowledges one leaves the daemon. Costs nothing when nothing changed. A storage that
        fails raises StudyStorageError (the daemon fails its studies and forgets it)."""
        pending = [s for s in self._open.values() if s.journal is not None and s.journal.pending]
        if pending and self.before_flush is not None:
            self.before_flush()
            failpoints.hit("after_fence")
        for storage in pending:
            if storage.flush():
                failpoints.hit("after_flush")

    def forget(self, url: str) -> None:
        storage = self._open.pop(_identity(url), None)
        if storage is not None:
            storage.close()

    def discard(self) -> None:
        """Release every storage, dropping what was not made durable: a broker that lost its
        lock stops, and what it changed since its last fenced flush is not its to keep."""
        for url in list(self._open):
            self.forget(url)

    def close(self) -> None:
        """Flush and release every storage (a daemon stopping, or one whose Redis lost its data:
        not fenced); a failure is logged."""
        for url in list(self._open):
            try:
                self._open[url].flush()
            except StudyStorageError as exc:
                log.error("%s", exc)
            self.forget(url)


def _identity(url: str) -> str:
    """What `url` opens: two spellings of one journal file are one storage (two journals on one
    file in one process would each wait for the Optuna lock the other holds)."""
    path = journal_path(url)
    return url if path is None else f"journal://{os.path.realpath(path)}"


def _open_guarded(
    url: str, superseded: set[str], writer: tuple[str, str, int] | None
) -> GuardedStorage:
    path = journal_path(url)
    journal = None
    try:
        if path is None:
            if writer is None or not is_sql(url):
                inner = open_storage(url)
            else:
                # Loaded only where an SQL storage is opened, as Optuna loads SQLAlchemy.
                from optuna_rq.storage.sql_fence import SqlFence

                fence = SqlFence(*writer)
                inner = open_storage(url, engine_kwargs=fence.engine_kwargs(url))
                assert isinstance(inner, optuna.storages.RDBStorage)
                fence.install(inner.engine, inner.scoped_session)
            # get_storage puts Optuna's trial cache in front of an RDBStorage, as create_study
            # would have done with the bare storage.
            return GuardedStorage(optuna.storages.get_storage(inner), url)
        from optuna.storages.journal import JournalStorage

        journal = BatchedJournal(path, superseded=superseded)
        return GuardedStorage(JournalStorage(journal), url, journal)
    except Exception as exc:
        if journal is not None:
            journal.close()
        if isinstance(exc, FenceLostError):
            raise
        raise storage_failure(url, exc) from exc
