"""`optuna-rq enqueue` on the broker's side: sets stored a slice a turn, skipped exactly as
Optuna's `enqueue_trial(skip_if_exists=True)` skips them, while the other studies go on.

In-process: a `Daemon` stepped by the test on the session's Redis (the restarts, which need real
processes, are in tests/processes/faults/test_enqueue_restart.py)."""

from __future__ import annotations

import collections
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import redis
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import create_trial

from optuna_rq.client import BrokerClient
from optuna_rq.daemon.broker_settings import BrokerSettings
from optuna_rq.daemon.daemon import Daemon
from optuna_rq.daemon.param_sets import ParamSetIndex, repeats
from optuna_rq.errors import ProtocolError
from optuna_rq.protocol import (
    BulkReceipt,
    Delete,
    Enqueue,
    Keys,
    Signer,
    decode_command,
    enqueue_commands,
)
from optuna_rq.protocol.spec import StudySpec
from tests.support.inline_workers import InlineWorkers

pytestmark = pytest.mark.timeout(600)

SPACE = {"x": {"type": "float", "low": -10.0, "high": 10.0}}
SPACE_X = FloatDistribution(-10, 10)

# -- the rule --------------------------------------------------------------------------------


def _pairs() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(stored, new) parameter sets: every kind of value Optuna's rule tells apart."""
    for stored, new in [
        (1.0, 1.0),
        (1.0, 1.0 + 0.9e-5),
        (1.0, 1.0 + 1.1e-5),
        (1.0, 1.0 - 0.9e-5),
        (1e5, 1e5 + 0.99),  # relative: 1e-5 of the stored value
        (1e5, 1e5 + 1.01),
        (1, 1.0),  # a float is not an int
        (1.0, 1),
        (1, True),  # a bool is an int: close to 1
        (True, 1),
        (True, True),
        (False, 0),
        (100000, 100001),  # ints are compared as floats, with the same tolerance
        (100000, 100002),
        (math.nan, math.nan),
        (math.inf, math.inf),
        (math.inf, -math.inf),
        (-math.inf, -math.inf),
        (0.0, -0.0),
        (0.0, 1e-300),
        (1e-300, 0.0),
        (-2.5, -2.5 * (1 + 0.9e-5)),
        (-2.5, 2.5),
        (5e-324, 5e-324),
        (1.7e308, 1.7e308 * (1 - 0.9e-5)),
        ("a", "a"),
        ("a", "b"),
        ("1", 1),
        (None, None),
        (None, 0),
        ([1, 2], [1, 2]),
        ([1, 2], [1, 2.0]),
        ([1, 2], [2, 1]),
        ({"a": 1}, {"a": 1}),
    ]:
        yield {"x": stored}, {"x": new}
    yield {"x": 1.0}, {"x": 1.0, "y": 2}
    yield {"x": 1.0, "y": "a"}, {"x": 1.0, "y": "a"}
    yield {"x": 1.0, "y": "a"}, {"y": "a", "x": 1.0 + 1e-6}
    yield {"x": 1.0, "y": "a"}, {"x": 1.0, "y": "b"}
    yield {}, {}
    rng = random.Random(25)
    for _ in range(3000):  # across magnitudes, near every edge of the tolerance
        value = rng.choice([-1, 1]) * 10 ** rng.uniform(-30, 30)
        factor = 1 + rng.choice([-1, 1]) * 1e-5 * rng.choice([0.98, 0.999, 1.001, 1.02, 0.5, 3])
        other = rng.uniform(-1, 1)
        yield {"x": value, "z": other}, {"x": value * factor, "z": other}


def test_the_skip_rule_is_optunas_for_every_kind_of_value() -> None:
    mismatches = []
    for stored, new in _pairs():
        study = optuna.create_study()
        study.enqueue_trial(stored)
        index = ParamSetIndex(study)
        assert index.catch_up()
        expected = study._should_skip_enqueue(new)
        if repeats(new, stored) != expected or index.holds(new) != expected:
            mismatches.append((stored, new, expected))
    assert not mismatches, mismatches[:10]


def test_a_run_trial_is_compared_by_its_params_and_a_running_one_as_it_grows() -> None:
    study = optuna.create_study()
    study.add_trial(
        create_trial(
            params={"x": 3.0, "n": 4, "c": "a"},
            distributions={
                "x": FloatDistribution(-10, 10),
                "n": IntDistribution(0, 10),
                "c": CategoricalDistribution(["a", "b"]),
            },
            value=1.0,
        )
    )
    running = study.ask()
    running.suggest_float("x", -10, 10)
    index = ParamSetIndex(study)
    assert index.catch_up()
    sets = [{"x": 3.0, "n": 4, "c": "a"}, {"x": 3.0, "n": 4.0, "c": "a"}, {"x": 3.0}]
    sets.append({"x": running.params["x"]})
    sets.append({"x": running.params["x"], "y": 1})
    assert [index.holds(s) for s in sets] == [study._should_skip_enqueue(s) for s in sets]
    assert [index.holds(s) for s in sets] == [True, False, False, True, False]

    running.suggest_int("y", 0, 3)  # a define-by-run trial gains a parameter as it runs
    index.refresh()
    assert [index.holds(s) for s in sets] == [study._should_skip_enqueue(s) for s in sets]
    assert [index.holds(s) for s in sets[3:]] == [False, study._should_skip_enqueue(sets[4])]


# -- through the broker ----------------------------------------------------------------------


@pytest.fixture
def daemon(conn: redis.Redis, prefix: str, tmp_path: Path) -> Iterator[Daemon]:
    settings = BrokerSettings(prefix=prefix, storage=f"journal:///{tmp_path}/studies.journal")
    daemon = Daemon(conn, settings)
    daemon.acquire()
    yield daemon
    daemon.dispatcher.stop_sampling()
    daemon.storages.close()
    daemon.release()


def _spec(name: str, *, space: dict[str, Any] = SPACE, **fields: Any) -> StudySpec:
    fields.setdefault("queue", "nobody")  # no worker: its trials wait, and it keeps running
    fields.setdefault("objective", "tests.support.objectives:noop")
    return StudySpec(name=name, space=space, sampler="random", seed=0, **fields)


def _settle(daemon: Daemon, conn: redis.Redis, prefix: str, *, turns: int = 100_000) -> int:
    """Step until every command is taken and every backlog applied; the turns it took."""
    for turn in range(1, turns + 1):
        daemon.step()
        if not daemon.backlog.pending and not conn.llen(Keys(prefix).commands):
            return turn
    raise AssertionError(f"still pending after {turns} turns")


def _enqueued(study: optuna.Study) -> list[dict[str, Any]]:
    return [t.system_attrs["fixed_params"] for t in study.get_trials(deepcopy=False) if
            "fixed_params" in t.system_attrs]  # fmt: skip


def test_the_broker_skips_the_sets_optuna_would_skip(
    daemon: Daemon, conn: redis.Redis, prefix: str, tmp_path: Path, caplog: Any
) -> None:
    # The study exists before the broker takes it: a trial run, and one enqueued.
    existing = optuna.create_study(
        study_name="s",
        storage=JournalStorage(JournalFileBackend(str(tmp_path / "studies.journal"))),
    )
    reference = optuna.create_study()
    for study in (existing, reference):
        study.add_trial(create_trial(params={"x": 3.0}, distributions={"x": SPACE_X}, value=1.0))
        study.enqueue_trial({"x": 4.0})
    del existing
    rng = random.Random(7)
    sets: list[dict[str, Any]] = [{"x": 3.0}, {"x": 4.0 * (1 + 0.9e-5)}, {"x": 4}, {"x": True}]
    for _ in range(1000):  # a third repeat an earlier set, within the tolerance or just past it
        if rng.random() < 0.33 and sets:
            old = rng.choice(sets)["x"]
            factor = 1 + rng.choice([0.5, 0.99, 1.01, 2]) * 1e-5
            sets.append({"x": old * factor if isinstance(old, float) else old})
        else:
            sets.append({"x": rng.uniform(-10, 10)})
    daemon.backlog.budget_s = 0.001  # many slices, each checked against those before it
    caplog.set_level(logging.INFO, logger="optuna_rq.broker")

    spec = _spec("s", n_trials=10_000, concurrency=1)
    BrokerClient(conn, prefix).submit(spec, enqueue=sets)
    turns = _settle(daemon, conn, prefix)

    for params in sets:
        reference.enqueue_trial(params, skip_if_exists=True)
    study = daemon.dispatcher.runs["s"].study
    assert _enqueued(study) == _enqueued(reference)
    assert turns > 10  # applied across turns, not in one
    stored = len(_enqueued(reference)) - 1  # one was enqueued before
    done = f"study 's': enqueued {stored} parameter sets ({len(sets) - stored} already there)"
    assert done in caplog.messages
    # Only enqueued sets were taken while they were being stored: none sampled.
    assert all("fixed_params" in t.system_attrs for t in study.get_trials(deepcopy=False)[1:])


def test_a_study_is_told_its_trials_while_100000_sets_are_stored_into_another(
    daemon: Daemon, conn: redis.Redis, prefix: str, inline_workers: InlineWorkers
) -> None:
    inline_workers.start(count=2)
    client = BrokerClient(conn, prefix)
    client.submit(_spec("busy", n_trials=1_000_000, concurrency=2, queue="default"))
    daemon.step()
    busy = daemon.dispatcher.runs["busy"]
    # 1e-2 apart in each: none repeats another. Sent with the submission, so that no trial of
    # `big` is sampled before them (one might repeat a set).
    sets = [{"x": i // 1000 * 1e-2, "y": i % 1000 * 1e-2} for i in range(100_000)]
    xy = {"x": SPACE["x"], "y": SPACE["x"]}
    client.submit(_spec("big", space=xy, n_trials=1_000_000, concurrency=4),
                  enqueue=sets)  # fmt: skip

    observations: list[tuple[int, int]] = []  # (sets left to store, trials told to `busy`)
    while daemon.backlog.pending or conn.llen(Keys(prefix).commands):
        daemon.step()
        left = daemon.backlog.left("big") + 2_000 * conn.llen(Keys(prefix).commands)
        observations.append((left, busy.budget.told))
    pending = [(left, told) for left, told in observations if left]
    growths = sum(1 for a, b in zip(pending, pending[1:], strict=False) if b[1] > a[1])
    # The other study was told trials all along, turn after turn: not once the sets were in.
    assert growths >= 20, pending[:: max(1, len(pending) // 20)]
    assert len({left for left, _ in pending}) >= 20  # stored over many turns

    big = daemon.dispatcher.runs["big"].study
    stored = collections.Counter((p["x"], p["y"]) for p in _enqueued(big))
    assert len(stored) == len(sets) and set(stored.values()) == {1}
    assert stored.keys() == {(s["x"], s["y"]) for s in sets}
    assert len(big.get_trials(deepcopy=False)) == len(sets)  # and nothing sampled
    told = busy.budget.told
    print(f"\n  {len(observations)} turns, {told} trials told to the other study meanwhile")


@pytest.mark.parametrize("command", ["cancel", "delete"])
def test_cancelling_or_deleting_a_study_drops_its_pending_sets(
    daemon: Daemon, conn: redis.Redis, prefix: str, command: str
) -> None:
    client = BrokerClient(conn, prefix)
    client.submit(_spec("s", n_trials=100_000, concurrency=1))
    daemon.step()
    daemon.backlog.budget_s = 0.001
    commands = client.enqueue_commands("s", [{"x": i * 1e-3} for i in range(6_000)])
    client.send(*commands)
    while conn.llen(Keys(prefix).commands):  # every command taken (in order: before a cancel)
        daemon.step()
    study = daemon.dispatcher.runs["s"].study
    assert 0 < daemon.backlog.left("s") and conn.exists(Keys(prefix).backlog_of("s"))
    if command == "cancel":
        client.cancel("s")
    else:
        client.send(Delete(study="s", force=True))
    stored = len(_enqueued(study))
    _settle(daemon, conn, prefix)
    assert not daemon.backlog.left("s")
    assert not conn.exists(Keys(prefix).backlog_of("s"))
    assert not conn.hexists(Keys(prefix).backlog, "s")
    assert len(_enqueued(study)) == stored  # nothing more stored after
    # Each command's receipt says what became of its sets: stored, or dropped and why.
    receipts = client.receipts(commands)
    assert len(receipts) == len(commands)
    assert sum(r.new for r in receipts.values()) == stored
    assert sum(r.dropped for r in receipts.values()) == 6_000 - stored
    why = f"the study was {'cancelled' if command == 'cancel' else 'deleted'}"
    assert {r.why for r in receipts.values() if r.dropped} == {why}


def test_each_enqueue_command_gets_a_receipt_of_new_and_existing_sets(
    daemon: Daemon, conn: redis.Redis, prefix: str
) -> None:
    client = BrokerClient(conn, prefix)
    client.submit(_spec("s", n_trials=100_000, concurrency=1))
    daemon.step()
    first = client.enqueue_commands("s", [{"x": 1.0}, {"x": 2.0}])
    client.send(*first)
    _settle(daemon, conn, prefix)
    # Split into commands of one set each: every command has its own receipt.
    again = [{"x": 1.0}, {"x": 3.0}, {"x": 2.0 * (1 + 0.5e-5)}, {"x": 3.0}]
    commands = [c for params in again for c in client.enqueue_commands("s", [params])]
    client.send(*commands)
    _settle(daemon, conn, prefix)
    assert [(r.new, r.existing) for r in client.receipts(first).values()] == [(2, 0)]
    receipts = client.receipts(commands)
    assert [(receipts[c.id].new, receipts[c.id].existing) for c in commands] == [
        (0, 1),
        (1, 0),
        (0, 1),  # within Optuna's 1e-5 of a stored set
        (0, 1),  # stored by the command before it
    ]
    assert all(r.study == "s" and not r.dropped and r.why is None for r in receipts.values())


def test_an_enqueue_for_a_study_that_is_not_running_gets_a_receipt_saying_so(
    daemon: Daemon, conn: redis.Redis, prefix: str
) -> None:
    client = BrokerClient(conn, prefix)
    commands = client.enqueue_commands("ghost", [{"x": 1.0}, {"x": 2.0}])
    client.send(*commands)
    _settle(daemon, conn, prefix)
    [receipt] = client.receipts(commands).values()
    assert (receipt.new, receipt.dropped, receipt.why) == (0, 2, "study 'ghost' is not running")


def test_a_receipt_opens_only_as_the_brokers_for_its_own_command(
    conn: redis.Redis, prefix: str
) -> None:
    keys = Keys(prefix)
    broker = Signer(b"a shared secret of 32 bytes, ok!")
    client = BrokerClient(conn, prefix, signer=broker)
    mine, other = (Enqueue(study="s", params=[{"x": 1.0}]) for _ in range(2))
    receipt = BulkReceipt(study="s", command=mine.id, new=1)
    conn.set(keys.receipt(mine.id), receipt.sealed(broker))
    assert client.receipts([mine]) == {mine.id: receipt}
    conn.set(keys.receipt(other.id), receipt.sealed(broker))  # copied under another command
    with pytest.raises(ProtocolError, match="bad signature"):
        client.receipts([other])
    unsigned = BulkReceipt(study="s", command=other.id, new=1).encode()
    conn.set(keys.receipt(other.id), unsigned)
    with pytest.raises(ProtocolError, match="is not signed"):
        client.receipts([other])


def test_large_lists_travel_as_commands_within_the_message_cap() -> None:
    sets = [{"x": i * 0.5, "name": f"set-{i}"} for i in range(25_000)]
    commands = enqueue_commands("s", sets, max_bytes=64 * 1024)
    assert len(commands) > 10
    assert all(len(c.encode()) <= 64 * 1024 for c in commands)
    decoded = [decode_command(c.encode(), max_bytes=64 * 1024) for c in commands]
    assert all(isinstance(c, Enqueue) for c in decoded)
    assert [p for c in decoded for p in c.params] == sets  # type: ignore[union-attr]


def test_an_ask_reads_no_more_trials_with_100000_waiting_than_with_10(tmp_path: Path) -> None:
    """Enqueued sets run one ask at a time: an ask that read every WAITING trial again (the
    broker's journal storage did) would cost O(sets) each, quadratic over the sets."""
    from optuna_rq.storage.guarded_storages import Storages
    from optuna_rq.storage.storage_policy import StoragePolicy

    url = f"journal:///{tmp_path}/studies.journal"
    storages = Storages(policy=StoragePolicy(url))
    storage = storages.open(url)
    study = optuna.create_study(study_name="s", storage=storage)
    reads = collections.Counter[str]()
    inner_get_trial = storage.inner.get_trial

    def get_trial(trial_id: int) -> Any:
        reads["get_trial"] += 1
        return inner_get_trial(trial_id)

    storage.inner.get_trial = get_trial  # type: ignore[method-assign]
    per_ask = []
    for n in (10, 100_000):
        for i in range(n):
            study.enqueue_trial({"x": float(i)})
        study.ask()  # reads the trials stored since the last ask, once
        reads.clear()
        for _ in range(5):
            study.ask()
        per_ask.append(reads["get_trial"] / 5)
    assert per_ask[1] <= per_ask[0] + 1, per_ask
    storages.close()


class _LosesReplies:
    """The connection, but every third transaction's reply is lost after Redis applied it."""

    def __init__(self, connection: redis.Redis) -> None:
        self._connection = connection
        self.lost = 0
        self._count = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        pipe = self._connection.pipeline(*args, **kwargs)
        execute = pipe.execute

        def lose_the_reply() -> Any:
            replies = execute()
            self._count += 1
            if self._count % 3 == 0:
                self.lost += 1
                raise redis.ConnectionError("the reply was lost")
            return replies

        pipe.execute = lose_the_reply  # type: ignore[method-assign]
        return pipe


def test_a_reply_lost_with_the_connection_loses_no_set_and_stores_none_twice(
    daemon: Daemon, conn: redis.Redis, prefix: str
) -> None:
    sets = [{"x": 1 + i * 1e-3} for i in range(5_000)]
    client = BrokerClient(conn, prefix)
    client.submit(_spec("s", n_trials=100_000, concurrency=1), enqueue=sets)
    daemon.step()  # the study starts: its one trial, an enqueued set, waits in its queue
    flaky = _LosesReplies(conn)
    daemon.backlog.connection = flaky  # type: ignore[assignment]
    daemon.backlog.budget_s = 0.002
    for _ in range(100_000):
        try:
            daemon.step()
        except redis.ConnectionError:
            continue  # as the daemon's run loop does: Redis is back at once here
        if not daemon.backlog.pending and not conn.llen(Keys(prefix).commands):
            break
    assert flaky.lost >= 5
    stored = collections.Counter(p["x"] for p in _enqueued(daemon.dispatcher.runs["s"].study))
    assert stored.keys() == {s["x"] for s in sets} and set(stored.values()) == {1}
    assert not conn.exists(Keys(prefix).backlog) and not conn.exists(Keys(prefix).backlog_of("s"))
