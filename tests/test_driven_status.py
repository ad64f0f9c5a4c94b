"""A driven study's status (a remote Optimizer's, on `Keys.driven`) and the broker's (on
`Keys.status`) never pass for each other, whoever can write to Redis: with a key per role, only
a front-door key signs a driven one and only the broker's a broker's; with one shared secret, or
none, a status names which it is and is refused on the other's hash. And the front doors read
a name as the broker's first."""

from __future__ import annotations

import pytest
import redis

from optuna_rq.client import BrokerClient
from optuna_rq.errors import ConfigError, ProtocolError
from optuna_rq.protocol import Keys, Role, Signer, StudyState, StudyStatus, generate_keyrings
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
