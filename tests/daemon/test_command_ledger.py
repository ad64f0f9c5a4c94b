"""Commands apply once: the broker's ledger of applied command ids (`daemon.ledger`), the inbox
that consults it, and the refusal log that keeps a flood of refusals out of the log.

The file's own rules first (replays, stale commands, compaction, a crash between the ledger and
the trim), then the broker in-process on the real Redis: every kind of command replayed is
refused and changes nothing, also after a restart, while a bulk command applied from its backlog
is not refused. The replays with real broker processes are tests/processes/faults/test_replays.py.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import redis

from optuna_rq.client import BrokerClient
from optuna_rq.daemon import BrokerSettings, Daemon
from optuna_rq.daemon.ledger import CommandLedger, ledger_file
from optuna_rq.dispatch.observer import RefusalLog, count_refusal
from optuna_rq.errors import ConfigError
from optuna_rq.protocol import Cancel, Change, Delete, Enqueue, Keys, Signer, StudySpec, Submit
from optuna_rq.storage.storage_access import open_storage

DAY = 24 * 3600.0
SECRET = b"0123456789abcdef0123456789abcdef"


class Clock:
    def __init__(self, now: float = 1_000_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def ledger(path: Path | None, clock: Clock) -> CommandLedger:
    return CommandLedger(path, window_s=DAY, skew_s=300.0, clock=clock)


def applied(book: CommandLedger, command: Any, *, bulk: bool = False) -> None:
    """What the inbox does with a command it applies: take, flush, trim."""
    assert book.judge(command).apply
    book.take(command, bulk=bulk)
    book.flush()
    book.trimmed()


# -- the ledger ----------------------------------------------------------------------------


def test_a_command_is_applied_once_and_its_id_outlives_the_process(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "commands" / "p.applied"
    book = ledger(path, clock)
    cancel = Cancel(study="s", sent_at=clock.now - 5)
    applied(book, cancel)
    again = book.judge(cancel)
    assert (again.apply, again.refused) == (False, "replayed command")
    assert cancel.id in again.why

    reopened = ledger(path, clock)  # a broker restarted: the ids are on its disk, not in Redis
    assert reopened.judge(cancel).refused == "replayed command"
    assert reopened.judge(Cancel(study="s", sent_at=clock.now)).apply  # another command


def test_a_command_sent_outside_the_window_is_refused_as_stale(tmp_path: Path) -> None:
    clock = Clock()
    book = ledger(tmp_path / "p.applied", clock)
    for sent_at in (clock.now - DAY - 1, clock.now + 301):  # too old; from too far ahead
        verdict = book.judge(Change(study="s", n_trials=3, sent_at=sent_at))
        assert (verdict.apply, verdict.refused) == (False, "stale command")
    assert book.judge(Change(study="s", n_trials=3, sent_at=clock.now + 299)).apply


def test_the_file_is_compacted_to_the_window_and_an_expired_id_stays_refused(
    tmp_path: Path,
) -> None:
    clock = Clock()
    path = tmp_path / "p.applied"
    book = ledger(path, clock)
    old = Delete(study="s", purge=True, sent_at=clock.now)
    applied(book, old)
    clock.now += DAY / 2
    recent = Delete(study="s", purge=True, sent_at=clock.now)
    applied(book, recent)
    with open(path, "a") as out:
        out.write("c 1000000000.5 0123")  # a line torn by a crash: ignored
    assert len(path.read_text().splitlines()) == 5

    clock.now += DAY / 2 + 1  # `old` is out of the window now
    reopened = ledger(path, clock)
    assert reopened.judge(recent).refused == "replayed command"
    assert old.id not in path.read_text()  # compacted away at start...
    assert path.read_text().splitlines() == [f"c {recent.sent_at!r} {recent.id}", "-"]
    assert reopened.judge(old).refused == "stale command"  # ...and refused all the same


def test_commands_taken_before_the_trim_are_in_doubt_not_replays(tmp_path: Path) -> None:
    """A broker that stopped after the ledger was durable and before the inbox was trimmed
    finds those commands again: applied, not replayed. A bulk one only if it reached its
    backlog, which the inbox asks the backlog."""
    clock = Clock()
    path = tmp_path / "p.applied"
    book = ledger(path, clock)
    applied(book, Cancel(study="earlier", sent_at=clock.now))
    submit = Cancel(study="s", sent_at=clock.now)
    enqueue = Enqueue(study="s", params=[{"x": 1.0}], sent_at=clock.now)
    for command, bulk in ((submit, False), (enqueue, True)):
        book.take(command, bulk=bulk)
    book.flush()  # and the broker dies here, before the trim

    reopened = ledger(path, clock)
    assert reopened.judge(submit).in_doubt and not reopened.bulk_in_doubt(submit)
    assert reopened.judge(enqueue).in_doubt and reopened.bulk_in_doubt(enqueue)
    reopened.trimmed()
    assert ledger(path, clock).judge(submit).refused == "replayed command"


def test_ledger_files_are_one_per_prefix(tmp_path: Path) -> None:
    names = {ledger_file(tmp_path, p).name for p in ("a:b", "a_b", "a/b", "ab")}
    assert len(names) == 4
    assert ledger_file(tmp_path, "optuna-rq") == tmp_path / "commands" / "optuna-rq.applied"


# -- the refusal log -------------------------------------------------------------------------


def test_refusals_are_logged_once_per_kind_then_once_a_minute(
    conn: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(0.0)
    logger = logging.getLogger("tests.refusals")
    refusals = RefusalLog(logger, every_s=60.0, clock=clock)
    with caplog.at_level(logging.ERROR, logger="tests.refusals"):
        refusals.refused("result", "bad signature 0")
        for i in range(1, 1001):  # a flood within the minute: held
            clock.now = i * 0.05
            refusals.refused("result", f"bad signature {i}")
        refusals.refused("command", "not signed")  # another kind: its first is said
        assert [r.getMessage() for r in caplog.records] == [
            "refused a result: bad signature 0",
            "refused a command: not signed",
        ]
        assert all(r.levelno == logging.ERROR for r in caplog.records)
        clock.now = 61.0
        refusals.refused("result", "bad signature 1001")  # a minute on: one line for them all
        clock.now = 62.0
        refusals.refused("result", "bad signature 1002")
    summary = caplog.records[2].getMessage()
    assert len(caplog.records) == 3
    assert summary.startswith("1001 more refused results since ")
    assert summary.endswith("(the last: bad signature 1001)")

    for _ in range(5):  # counted every time, whatever is logged
        count_refusal(conn, prefix, "result", "why")
    assert int(conn.hget(Keys(prefix).refused, "result")) == 5


# -- through the broker ----------------------------------------------------------------------


def spec(name: str = "s", **fields: Any) -> StudySpec:
    fields.setdefault("n_trials", 100)
    return StudySpec(
        name=name,
        objective="tests.support.objectives:noop",
        space={"x": {"type": "float", "low": 0.0, "high": 1.0}},
        concurrency=1,
        queue="nobody",  # no worker: the study runs, its trial waits
        sampler="random",
        seed=0,
        **fields,
    )


class Broker:
    """Daemons on one prefix, one at a time, sharing a state directory: restarts."""

    def __init__(self, conn: redis.Redis, prefix: str, state: Path) -> None:
        self.conn, self.prefix = conn, prefix
        self.settings = BrokerSettings(
            prefix=prefix,
            storage=f"journal:///{state}/studies.journal",
            command_ledger=ledger_file(state, prefix),
        )
        self.signer = Signer(SECRET)
        self.client = BrokerClient(conn, prefix, signer=self.signer)
        self.daemon: Daemon | None = None

    def start(self) -> Daemon:
        self.stop()
        self.daemon = Daemon(self.conn, self.settings, self.signer)
        self.daemon.acquire()
        self.daemon.registry.reattach()  # as `run` starts: the studies stored are taken over
        return self.daemon

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.dispatcher.stop_sampling()
            self.daemon.storages.close()
            self.daemon.release()
            self.daemon = None

    def sent(self, *commands: Any) -> list[bytes]:
        """Send `commands` as the front door does; the raw bytes it queued (what a replay
        copies off the inbox before the broker takes them)."""
        before = self.conn.llen(Keys(self.prefix).commands)
        self.client.send(*commands)
        return list(self.conn.lrange(Keys(self.prefix).commands, before, -1))

    def settle(self) -> None:
        assert self.daemon is not None
        for _ in range(10_000):
            self.daemon.step()
            if not self.daemon.backlog.pending and not self.conn.llen(Keys(self.prefix).commands):
                return
        raise AssertionError("commands still pending")

    def replay(self, raws: list[bytes]) -> None:
        self.conn.rpush(Keys(self.prefix).commands, *raws)
        self.settle()

    def refused(self) -> dict[str, int]:
        stored: dict[bytes, bytes] = self.conn.hgetall(Keys(self.prefix).refused)  # type: ignore[assignment]
        return {k.decode(): int(v) for k, v in stored.items()}

    def trials(self, name: str = "s") -> list[optuna.trial.FrozenTrial]:
        storage = open_storage(self.settings.storage)
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


@pytest.fixture
def broker(conn: redis.Redis, prefix: str, tmp_path: Path) -> Iterator[Broker]:
    group = Broker(conn, prefix, tmp_path)
    group.start()
    yield group
    group.stop()


def test_every_kind_of_command_replayed_changes_nothing_also_after_a_restart(
    broker: Broker,
) -> None:
    submit = broker.sent(Submit(spec=spec(n_trials=5)))
    broker.settle()
    shrink = broker.sent(Change(study="s", n_trials=2))
    broker.settle()
    grow = broker.sent(Change(study="s", n_trials=9))
    enqueue = broker.sent(Enqueue(study="s", params=[{"x": 0.25}]))
    broker.settle()
    daemon = broker.daemon
    assert daemon is not None and daemon.specs["s"].n_trials == 9

    broker.replay(shrink)  # the budget stays as the operator set it last
    assert daemon.specs["s"].n_trials == 9
    broker.replay(submit)  # a resubmission would set the budget back to 5
    assert daemon.specs["s"].n_trials == 9
    assert broker.refused() == {"replayed command": 2}

    cancel = broker.sent(Cancel(study="s"))
    delete = broker.sent(Delete(study="s", purge=True))
    broker.settle()
    assert broker.client.status("s") is None
    broker.sent(Submit(spec=spec(n_trials=3)))  # the operator submits it anew
    broker.settle()
    broker.settle()  # its enqueued set is applied from the backlog, then its first trial sent

    daemon = broker.start()  # a restart: the ledger is in the state directory
    broker.replay(cancel + delete + enqueue + grow)
    assert daemon.specs["s"].n_trials == 3 and "s" in daemon.dispatcher.runs
    assert [t.params for t in broker.trials()] != []  # its trials are kept
    assert [t.system_attrs.get("fixed_params") for t in broker.trials()] == [None]
    assert broker.refused() == {"replayed command": 6}


def test_a_bulk_command_applied_from_its_backlog_after_a_restart_is_not_refused(
    broker: Broker,
) -> None:
    broker.sent(Submit(spec=spec()))
    broker.settle()
    sets = [{"x": i / 10_000} for i in range(6_000)]
    broker.sent(*broker.client.enqueue_commands("s", sets))
    daemon = broker.daemon
    assert daemon is not None
    while broker.conn.llen(Keys(broker.prefix).commands):
        daemon.step()  # taken onto the backlog, slices applied
    assert daemon.backlog.pending

    broker.start()  # the rest is applied by the next broker, from the backlog
    broker.settle()
    stored = [t.system_attrs["fixed_params"] for t in broker.trials() if t.system_attrs]
    assert stored == sets
    assert broker.refused() == {}


def test_a_command_applied_before_an_outage_is_trimmed_not_refused_nor_applied_again(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis lost between applying a batch and trimming it, or between a bulk command's ids and
    its move onto the backlog: the batch is read again; what was applied is trimmed quietly, and
    the bulk command that never reached its backlog is applied, once."""
    daemon = broker.daemon
    assert daemon is not None
    broker.sent(Submit(spec=spec(n_trials=5)), Change(study="s", n_trials=7))
    broker.sent(Enqueue(study="s", params=[{"x": 0.5}]))

    def lost(*args: Any, **kwargs: Any) -> None:
        raise redis.ConnectionError("lost")

    with monkeypatch.context() as patched:
        patched.setattr(daemon.backlog, "take", lost)
        with pytest.raises(redis.ConnectionError):
            daemon.step()
    assert daemon.specs["s"].n_trials == 7
    assert broker.conn.llen(Keys(broker.prefix).commands) == 3  # nothing trimmed

    daemon = broker.start()  # and the broker restarted meanwhile, too
    broker.settle()
    broker.settle()
    assert daemon.specs["s"].n_trials == 7
    assert [t.system_attrs.get("fixed_params") for t in broker.trials()] == [{"x": 0.5}]
    assert broker.refused() == {}


def test_commands_wait_in_the_inbox_while_the_ledger_cannot_be_written(
    broker: Broker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = broker.daemon
    assert daemon is not None
    raws = broker.sent(Submit(spec=spec(n_trials=5)), Change(study="s", n_trials=7))

    def full() -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched, caplog.at_level(logging.ERROR):
        patched.setattr(daemon.ledger, "flush", full)
        for _ in range(3):
            daemon.step()  # applied once, not trimmed: their ids are not durable
    assert broker.conn.llen(Keys(broker.prefix).commands) == 2
    assert daemon.specs["s"].n_trials == 7
    said = [r.getMessage() for r in caplog.records if "ledger" in r.getMessage()]
    assert len(said) == 1 and "No space left" in said[0], said

    broker.settle()  # written: trimmed
    assert broker.refused() == {}
    broker.start()
    broker.replay(raws)
    assert broker.refused() == {"replayed command": 2}


def test_a_broker_whose_ledger_is_lost_says_so_and_one_that_cannot_keep_it_does_not_start(
    broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker.sent(Submit(spec=spec()))
    broker.settle()
    broker.stop()
    path = broker.settings.command_ledger
    assert path is not None and path.exists()
    path.unlink()  # a state directory that did not survive the restart
    with caplog.at_level(logging.WARNING, logger="optuna_rq.broker"):
        broker.start()
    assert any("could be replayed" in r.getMessage() for r in caplog.records)
    broker.stop()

    blocked = tmp_path / "a file"
    blocked.write_text("")
    settings = BrokerSettings(
        prefix=broker.prefix, storage="memory", command_ledger=blocked / "p.applied"
    )
    daemon = Daemon(broker.conn, settings, broker.signer)
    with pytest.raises(ConfigError, match="cannot keep the ledger of applied commands"):
        daemon.acquire()
    assert not broker.conn.exists(Keys(broker.prefix).broker)  # the lock is not left behind
