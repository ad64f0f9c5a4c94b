"""A driven study's status (a remote Optimizer's, on `Keys.driven`) and the broker's (on
`Keys.status`) never pass for each other, whoever can write to Redis: with a key per role, only
a front-door key signs a driven one and only the broker's a broker's; with one shared secret, or
none, a status names which it is and is refused on the other's hash. And the front doors read
a name as the broker's first."""

from __future__ import annotations

import dataclasses

import pytest
import redis

from optuna_rq.client import BrokerClient
from optuna_rq.errors import ConfigError, ProtocolError, StudyConflictError
from optuna_rq.protocol import (
    Cancel,
    Change,
    Keys,
    Role,
    Signer,
    StudySpec,
    StudyState,
    StudyStatus,
    Submit,
    TrialStateName,
    TrialSummary,
    generate_keyrings,
)
from optuna_rq.protocol.liveness import judge_driver
from optuna_rq.protocol.status import RefusedStatus

RINGS = generate_keyrings()
SIGNERS = {
    "role keys": {role: Signer(keyring=RINGS[role]) for role in Role},
    "shared secret": dict.fromkeys(Role, Signer(b"s" * 32)),
    "unsigned": dict.fromkeys(Role, Signer()),
}


def status(name: str, *, driver: str | None) -> StudyStatus:
    return StudyStatus(
        name=name,
        state=StudyState.RUNNING,
        objective="m:f",
        directions=["minimize"],
        n_trials=4,
        concurrency=1,
        priority=1.0,
        storage="",
        driver=driver,
        turn_at_s=None if driver is None else 1000.0,
    )


@pytest.mark.parametrize("signing", SIGNERS)
def test_neither_kind_of_status_opens_as_the_other(
    conn: redis.Redis, prefix: str, signing: str
) -> None:
    signers, keys = SIGNERS[signing], Keys(prefix)
    driven = status("d", driver="host:12").sealed(signers[Role.CLIENT])
    brokers = status("b", driver=None).sealed(signers[Role.BROKER])
    conn.hset(keys.driven, mapping={"d": driven, "b-copy": brokers})
    conn.hset(keys.status, mapping={"b": brokers, "d-copy": driven})
    for reader in (Role.WORKER, Role.CLIENT):  # any role's key reads them
        client = BrokerClient(conn, prefix, signer=signers[reader])
        got = client.status("d")
        assert got is not None and got.driver == "host:12"
        assert client.status("b") == StudyStatus.opened(brokers, signers[reader], name="b")
        for name in ("d-copy", "b-copy"):  # one's status copied onto the other's hash
            with pytest.raises(ProtocolError, match="refused"):
                client.status(name)
        listing = {s.name: s for s in client.statuses()}
        assert isinstance(listing["d-copy"], RefusedStatus)
        assert isinstance(listing["b-copy"], RefusedStatus)


def test_a_front_door_key_signs_no_broker_status_and_the_broker_key_no_driven_one() -> None:
    with pytest.raises(ConfigError, match="a client key cannot sign a study status"):
        status("b", driver=None).sealed(Signer(keyring=RINGS[Role.CLIENT]))
    with pytest.raises(ConfigError, match="a broker key cannot sign a driven study status"):
        status("d", driver="host:12").sealed(Signer(keyring=RINGS[Role.BROKER]))


def test_a_name_the_broker_holds_is_the_brokers(conn: redis.Redis, prefix: str) -> None:
    """The broker's status of a name hides an Optimizer's, in `status NAME` and the listing."""
    keys, signer = Keys(prefix), Signer()
    conn.hset(keys.driven, "x", status("x", driver="host:12").sealed(signer))
    client = BrokerClient(conn, prefix, signer=signer)
    assert client.status("x").driven  # type: ignore[union-attr]
    conn.hset(keys.status, "x", status("x", driver=None).sealed(signer))
    assert not client.status("x").driven  # type: ignore[union-attr]
    assert [(s.name, getattr(s, "driver", "?")) for s in client.statuses()] == [("x", None)]


def test_a_driver_is_judged_by_its_last_turn_on_the_redis_clock() -> None:
    running = status("d", driver="host:12")  # turned at 1000.0
    assert judge_driver(running, now_s=1004.0).alive  # type: ignore[union-attr]
    gone = judge_driver(running, now_s=1040.0)
    assert gone is not None and not gone.alive
    assert gone.describe() == "the Optimizer on host:12 stopped 40s ago"
    assert judge_driver(status("b", driver=None), now_s=1040.0) is None


def test_commands_about_a_driven_study_are_refused_and_a_submission_only_while_it_runs(
    conn: redis.Redis, prefix: str
) -> None:
    """A study an Optimizer runs: broker commands about it are refused, sending nothing; a
    submission of its name only while its process turns (with enqueued sets, the submission
    decides for them); once it ended, the name is free for the broker."""
    keys, signer = Keys(prefix), Signer()
    client = BrokerClient(conn, prefix, signer=signer)
    seconds, micros = conn.time()
    now = float(seconds) + micros / 1e6
    running = dataclasses.replace(status("x", driver="host:12"), turn_at_s=now)
    conn.hset(keys.driven, "x", running.sealed(signer))
    spec = StudySpec(
        name="x", objective="tests.support.objectives:noop", space={}, n_trials=1, concurrency=1
    )
    batches = [
        [Submit(spec=spec)],
        [Submit(spec=spec), *client.enqueue_commands("x", [{"x": 0.5}])],
        [Cancel(study="x")],
        [Change(study="x", concurrency=2)],
        client.enqueue_commands("x", [{"x": 0.5}]),
    ]
    for batch in batches:
        with pytest.raises(StudyConflictError, match="run by the Optimizer on host:12"):
            client.send(*batch)
    assert conn.llen(keys.commands) == 0
    ended = dataclasses.replace(running, state=StudyState.FINISHED)
    conn.hset(keys.driven, "x", ended.sealed(signer))
    for batch in batches[2:]:
        with pytest.raises(StudyConflictError, match="not by the broker"):
            client.send(*batch)
    client.send(*batches[1])  # the name is free: the submission and its sets go
    assert conn.llen(keys.commands) == 2


@pytest.mark.parametrize("signing", SIGNERS)
def test_neither_kind_of_published_trial_opens_as_the_other(signing: str) -> None:
    """A trial an Optimizer published (`driven`) and one the broker published, under one study's
    name: each opens only as its own kind (with role keys, by who signed it)."""
    signers = SIGNERS[signing]
    summary = TrialSummary(number=0, state=TrialStateName.COMPLETE, values=[1.0], params={})
    driven = summary.sealed(signers[Role.CLIENT], study="s", driven=True)
    brokers = summary.sealed(signers[Role.BROKER], study="s")
    reader = signers[Role.WORKER]
    assert TrialSummary.opened(driven, reader, study="s", field="0", driven=True) == summary
    assert TrialSummary.opened(brokers, reader, study="s", field="0") == summary
    if signing == "unsigned":
        return  # nothing tells them apart: without signing, Redis write access decides
    with pytest.raises(ProtocolError, match="not signed by the broker"):
        TrialSummary.opened(driven, reader, study="s", field="0")
    with pytest.raises(ProtocolError, match="not signed by a front-door key"):
        TrialSummary.opened(brokers, reader, study="s", field="0", driven=True)
