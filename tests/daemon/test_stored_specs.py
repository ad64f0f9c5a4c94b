"""What the broker keeps in `<prefix>:studies` is its own: sealed with signing on, and opened when
it is read back; and whatever a spec says, the broker opens only the storages its operator allows.

An in-process Daemon on the real Redis, restarted by making a second one on the same prefix (the
planted-spec attack with real processes, a forced restart and workers is
tests/processes/faults/test_planted_specs.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from optuna_rq.client import BrokerClient
from optuna_rq.daemon import BrokerSettings, Daemon
from optuna_rq.errors import ProtocolError
from optuna_rq.protocol import (
    Keys,
    Role,
    Signer,
    StudySpec,
    generate_keyrings,
    open_stored_spec,
    seal_stored_spec,
)

pytestmark = pytest.mark.timeout(60)


def _spec(name: str, storage: str | None = None) -> StudySpec:
    return StudySpec(
        name=name,
        objective="tests.support.objectives:quadratic",
        space={"x": {"type": "float", "low": 0, "high": 1}},
        n_trials=2,
        concurrency=1,
        storage=storage,
    )


def _signers(kind: str) -> tuple[Signer, Signer]:
    """(the broker's signer, a front door's)"""
    if kind == "secret":
        shared = Signer(b"s" * 32)
        return shared, shared
    rings = generate_keyrings()
    return Signer(keyring=rings[Role.BROKER]), Signer(keyring=rings[Role.CLIENT])


class Brokers:
    """Daemons on one prefix, one at a time: `start()` makes the next (a restarted broker)."""

    def __init__(self, conn: redis.Redis, prefix: str, signer: Signer, **settings: object):
        self.conn, self.prefix, self.signer, self.settings = conn, prefix, signer, settings
        self.current: Daemon | None = None

    def start(self) -> Daemon:
        self.stop()
        settings = BrokerSettings(prefix=self.prefix, storage="memory", **self.settings)  # type: ignore[arg-type]
        self.current = Daemon(self.conn, settings, self.signer)
        self.current.acquire()
        self.current.registry.reattach()
        return self.current

    def stop(self) -> None:
        if self.current is not None:
            self.current.dispatcher.stop_sampling()
            self.current.release()
            self.current = None


@pytest.fixture
def brokers(conn: redis.Redis, prefix: str) -> Iterator[list[Brokers]]:
    made: list[Brokers] = []
    yield made
    for group in made:
        group.stop()


def _refused(conn: redis.Redis, prefix: str) -> dict[str, int]:
    raw: dict[bytes, bytes] = conn.hgetall(Keys(prefix).refused)  # type: ignore[assignment]
    return {k.decode(): int(v) for k, v in raw.items()}


@pytest.mark.parametrize("kind", ["secret", "keys"])
def test_a_stored_spec_the_broker_did_not_seal_for_its_name_is_refused_at_restart(
    conn: redis.Redis,
    prefix: str,
    brokers: list[Brokers],
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    broker_signer, client_signer = _signers(kind)
    keys = Keys(prefix)
    group = Brokers(conn, prefix, broker_signer)
    brokers.append(group)
    daemon = group.start()
    client = BrokerClient(conn, prefix, signer=client_signer)

    # Given a study the broker stored, sealed and bound to its name
    client.submit(_spec("mine"))
    daemon.step()
    raw: bytes = conn.hget(keys.studies, "mine")  # type: ignore[assignment]
    assert open_stored_spec(client_signer, "mine", raw).name == "mine"
    with pytest.raises(ProtocolError, match="not signed"):
        open_stored_spec(client_signer, "mine", _spec("mine").encode())
    assert client.stored_spec("mine") is not None  # a front door verifies it too

    # When an attacker without the key copies it under another name, and plants an unsigned
    # spec (as a study stored before signing was turned on is)
    conn.hset(keys.studies, "copied", raw)
    conn.hset(keys.studies, "planted", _spec("planted").encode())
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="optuna_rq.broker"):
        daemon = group.start()  # the broker restarts

    # Then neither is started; each is refused, counted and logged once, saying how to resubmit
    assert set(daemon.dispatcher.runs) == {"mine"}
    assert _refused(conn, prefix) == {"spec": 2}
    copied = [r.getMessage() for r in caplog.records if "'copied'" in r.getMessage()]
    planted = [r.getMessage() for r in caplog.records if "'planted'" in r.getMessage()]
    assert len(copied) == 1 and len(planted) == 1, caplog.records
    assert "refused its stored spec" in planted[0] and "not signed" in planted[0]
    assert "submit it again" in planted[0] and "optuna-rq delete planted" in planted[0]
    # A front door believes neither
    assert client.stored_spec("copied") is None and client.stored_spec("planted") is None

    # And the owner of a study stored before signing resubmits it: its new spec replaces it
    client.submit(_spec("planted").with_changes(n_trials=3))
    daemon.step()
    assert "planted" in daemon.dispatcher.runs
    stored: bytes = conn.hget(keys.studies, "planted")  # type: ignore[assignment]
    assert open_stored_spec(client_signer, "planted", stored).n_trials == 3


def test_an_unsigned_broker_refuses_a_spec_stored_under_another_name(
    conn: redis.Redis, prefix: str, brokers: list[Brokers]
) -> None:
    keys = Keys(prefix)
    conn.hset(keys.studies, "other", seal_stored_spec(Signer(), _spec("mine")))
    group = Brokers(conn, prefix, Signer())
    brokers.append(group)
    daemon = group.start()
    assert not daemon.dispatcher.runs and _refused(conn, prefix) == {"spec": 1}


def test_a_storage_the_operator_did_not_allow_fails_its_study_at_submit_and_at_restart(
    conn: redis.Redis, prefix: str, brokers: list[Brokers], tmp_path: Path
) -> None:
    keys = Keys(prefix)
    allowed = tmp_path / "allowed"
    group = Brokers(conn, prefix, Signer(), allowed_storages=(f"{allowed}/*.journal",))
    brokers.append(group)
    daemon = group.start()
    client = BrokerClient(conn, prefix, signer=Signer())

    # A submission naming a storage the broker's operator did not allow fails, saying why;
    # nothing of it is opened, created or kept.
    evil = f"journal:///{tmp_path}/evil/x.journal"
    client.submit(_spec("evil", storage=evil))
    daemon.step()
    status = client.status("evil")
    assert status is not None and status.state.value == "failed"
    assert status.error == (
        f"storage {evil!r} is not allowed on this broker: it opens only its default storage "
        "and what its --allow-storage patterns match (its operator allows this one with: "
        f"optuna-rq broker --allow-storage 'journal://{tmp_path}/evil/x.journal')"
    )
    assert not (tmp_path / "evil").exists() and not conn.hexists(keys.studies, "evil")
    assert _refused(conn, prefix) == {"storage": 1}

    # One through `..` is the same storage, refused the same way.
    escape = f"journal:///{allowed}/../evil/x.journal"
    client.submit(_spec("escape", storage=escape))
    daemon.step()
    assert client.status("escape").state.value == "failed"  # type: ignore[union-attr]
    assert not (tmp_path / "evil").exists()

    # An allowed one runs.
    ok = f"journal:///{allowed}/ok.journal"
    client.submit(_spec("ok", storage=ok))
    daemon.step()
    assert "ok" in daemon.dispatcher.runs and (allowed / "ok.journal").exists()

    # A spec planted at rest (signing off: anyone can) naming Optuna's JournalRedis is refused
    # at restart: nothing connects to it, its study fails saying why, the others run on.
    conn.hset(keys.studies, "pickled", _spec("pickled", "redis://127.0.0.1:1/0").encode())
    daemon = group.start()
    assert set(daemon.dispatcher.runs) == {"ok"}
    status = client.status("pickled")
    assert status is not None and status.state.value == "failed"
    assert "JournalRedis" in str(status.error) and "--allow-storage" in str(status.error)
    assert _refused(conn, prefix) == {"storage": 3}
