"""What a Redis writer plants on the backlogs (`daemon.backlog`) is refused at the broker's start,
never fatal: with a key per role, a real broker and a real redis-server.

The broker reads `<prefix>:backlog` (study -> cursor) and `<prefix>:backlog:<study>` (sealed bulk
commands) once, when it starts, to resume what an earlier broker left. Whoever can write to Redis
can write there: a cursor that is not a number, a study name that is not UTF-8, junk, or a signed
enqueue of one study copied onto another's backlog (its sets would run in a study whose owner
never sent them). Each is dropped, counted in `<prefix>:refused` as `backlog`, and the broker
serves on.
"""

from __future__ import annotations

import subprocess

import pytest

from optuna_rq.protocol import ENV_KEY, Enqueue, Keys, Record, Role, Signer, generate_keyrings
from tests.support.cluster import Cluster
from tests.support.helpers import wait_until

pytestmark = pytest.mark.timeout(240)

RINGS = generate_keyrings()


@pytest.fixture
def keyed(cluster: Cluster) -> Cluster:
    cluster.role_env = {role: {ENV_KEY: RINGS[role].to_token()} for role in Role}
    return cluster


def _refused(cluster: Cluster, kind: str) -> int:
    return int(cluster.conn.hget(Keys(cluster.prefix).refused, kind) or 0)


def _serving_or_dead(cluster: Cluster, broker: subprocess.Popen[bytes], kind: str) -> None:
    wait_until(
        lambda: broker.poll() is not None or _refused(cluster, kind) >= 1,
        timeout_s=60,
        message="the broker neither refused the planted backlog nor exited",
    )
    assert broker.poll() is None, f"the broker exited with {broker.returncode}"


def test_a_malformed_backlog_is_refused_and_the_broker_serves_on(keyed: Cluster) -> None:
    name = keyed.submit("steady", n_trials=1_000_000, concurrency=1, extra=("--queue", "nobody"))
    keys = Keys(keyed.prefix)
    keyed.conn.hset(keys.backlog, name, "not a number")
    keyed.conn.rpush(keys.backlog_of(name), b"junk")
    keyed.conn.hset(keys.backlog, b"\xff\xfe", 0)
    keyed.conn.hset(keys.backlog, "negative", -3)
    keyed.conn.hset(keys.backlog, "a-string", 0)
    keyed.conn.set(keys.backlog_of("a-string"), b"not a list")
    broker = keyed.start_broker()
    _serving_or_dead(keyed, broker, "backlog")
    wait_until(lambda: _refused(keyed, "backlog") >= 5, timeout_s=30)
    # and it still runs the owner's study
    wait_until(lambda: keyed.status(name).get("state") == "running", timeout_s=60)
    assert broker.poll() is None


def test_an_enqueue_copied_onto_another_studys_backlog_runs_nothing_there(
    keyed: Cluster,
) -> None:
    owner = keyed.submit("steady", n_trials=1_000_000, concurrency=1, extra=("--queue", "nobody"))
    victim = keyed.submit("steady", n_trials=1_000_000, concurrency=1, extra=("--queue", "nobody"))
    # The owner's signed enqueue, as a Redis reader sees it on the inbox or on its backlog.
    client = Signer.from_env(Role.CLIENT, keyed.role_env[Role.CLIENT])
    raw = client.seal(Record.COMMAND, Enqueue(study=owner, params=[{"x": 0.123}]).encode())
    keys = Keys(keyed.prefix)
    keyed.conn.rpush(keys.backlog_of(victim), raw)
    keyed.conn.hset(keys.backlog, victim, 0)
    broker = keyed.start_broker()
    _serving_or_dead(keyed, broker, "backlog")
    wait_until(lambda: keyed.status(victim).get("state") == "running", timeout_s=60)
    assert not keyed.conn.exists(keys.backlog_of(victim))
    fixed = [t.system_attrs.get("fixed_params") for t in keyed.trials(victim)]
    assert {"x": 0.123} not in fixed, fixed
