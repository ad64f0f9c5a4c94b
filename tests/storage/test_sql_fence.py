"""The broker's fence inside SQL study storages (`optuna_rq.storage.sql_fence`): once a broker of
a later generation claimed the prefix, no write transaction of an earlier one commits, whatever
point it was frozen at; reads go on; other prefixes, and the same prefix on another Redis, are
untouched. On PostgreSQL (skipped loudly
where none answers) and SQLite."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from sqlalchemy import event

from optuna_rq.errors import FenceLostError
from optuna_rq.storage.sql_fence import SqlFence
from optuna_rq.storage.storage_access import open_storage

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["postgresql", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'studies.db'}"
    else:
        yield request.getfixturevalue("empty_database")


def broker_storage(
    url: str, prefix: str, generation: int, epoch: str = "e1"
) -> optuna.storages.RDBStorage:
    """The storage at `url` as the broker of `prefix` on the Redis of `epoch`, acquisition
    `generation`, opens it."""
    fence = SqlFence(prefix, epoch, generation)
    storage = open_storage(url, engine_kwargs=fence.engine_kwargs(url))
    assert isinstance(storage, optuna.storages.RDBStorage)
    fence.install(storage.engine, storage.scoped_session)
    return storage


def trials(url: str, name: str) -> int:
    return len(optuna.load_study(study_name=name, storage=url).trials)


def test_a_broker_taken_over_commits_no_write_and_reads_on(database: str) -> None:
    old = broker_storage(database, "p", 5)
    study = optuna.create_study(study_name="s", storage=old)
    study.ask()  # the old broker's writes commit while it holds the fence
    other_prefix = broker_storage(database, "q", 1)
    other_redis = broker_storage(database, "p", 1, epoch="e2")  # prefix p on another Redis
    new = broker_storage(database, "p", 6)  # took prefix p over
    study_id = old.get_study_id_from_name("s")  # a read: no fence
    with pytest.raises(FenceLostError, match="lost the broker lock"):
        old.create_new_trial(study_id)
    with pytest.raises(FenceLostError):
        old.set_study_user_attr(study_id, "k", "v")
    assert trials(database, "s") == 1
    assert "k" not in optuna.load_study(study_name="s", storage=database).user_attrs
    new.create_new_trial(study_id)  # the new broker writes
    other_prefix.create_new_trial(study_id)  # and another prefix's broker is untouched,
    other_redis.create_new_trial(study_id)  # and that of the same prefix on another Redis
    assert trials(database, "s") == 4
    for storage in (old, new, other_prefix, other_redis):
        storage.engine.dispose()


def test_a_broker_taken_over_cannot_claim_the_fence_back(database: str) -> None:
    new = broker_storage(database, "p", 7)
    with pytest.raises(FenceLostError, match="later than this broker's 6"):
        broker_storage(database, "p", 6)
    optuna.create_study(study_name="s", storage=new)  # still the new broker's
    again = broker_storage(database, "p", 7)  # the same broker opening it again
    again.engine.dispose()
    new.engine.dispose()


@pytest.mark.parametrize("round_", range(3))
def test_a_transaction_frozen_past_its_check_is_ended_by_the_claim(
    empty_database: str, round_: int
) -> None:
    """PostgreSQL: the old broker froze after its commit-time check (its share lock on the fence
    held) and before COMMIT. The new broker's claim ends its session instead of waiting for it,
    and the frozen write never commits."""
    old = broker_storage(empty_database, "p", 5)
    study_id = old.create_new_study([optuna.study.StudyDirection.MINIMIZE], "s")
    frozen, wake = threading.Event(), threading.Event()

    def freeze(session: object) -> None:  # runs after the fence's own check
        frozen.set()
        wake.wait(timeout=60)

    event.listen(old.scoped_session, "before_commit", freeze)
    outcome: list[BaseException | None] = []

    def write() -> None:
        try:
            old.create_new_trial(study_id)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    assert frozen.wait(timeout=30)
    new = broker_storage(empty_database, "p", 6)  # returns: the frozen session was ended
    wake.set()
    writer.join(timeout=60)
    assert outcome and outcome[0] is not None, "the frozen broker's write committed"
    assert trials(empty_database, "s") == 0
    new.create_new_trial(study_id)
    assert trials(empty_database, "s") == 1
    event.remove(old.scoped_session, "before_commit", freeze)
    old.engine.dispose()
    new.engine.dispose()


def test_a_claim_ends_only_its_own_prefixs_stale_sessions(empty_database: str) -> None:
    """PostgreSQL: the sessions a claim ends are those of its prefix's earlier brokers, never
    another prefix's, even one whose name begins the same."""
    others = {
        "same prefix, earlier": SqlFence("p", "e1", 5),
        "longer prefix": SqlFence("pq", "e1", 1),
        "shorter prefix": SqlFence("", "e1", 1),
        "same prefix, another Redis": SqlFence("p", "e2", 1),
    }
    engines = {
        what: sqlalchemy.create_engine(empty_database, **fence.engine_kwargs(empty_database))
        for what, fence in others.items()
    }
    held = {what: engine.connect() for what, engine in engines.items()}
    for connection in held.values():
        connection.exec_driver_sql("SELECT 1")
    SqlFence("p", "e1", 6)._end_stale_sessions(sqlalchemy.create_engine(empty_database))
    alive = {}
    for what, connection in held.items():
        try:
            connection.exec_driver_sql("SELECT 1")
            alive[what] = True
        except sqlalchemy.exc.DBAPIError:
            alive[what] = False
    assert alive == {
        "same prefix, earlier": False,
        "longer prefix": True,
        "shorter prefix": True,
        "same prefix, another Redis": True,
    }
    for engine in engines.values():
        engine.dispose()
