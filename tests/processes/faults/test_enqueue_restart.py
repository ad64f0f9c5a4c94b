"""A broker SIGKILLed while it stores an enqueue, at every point that matters, and restarted:
every set ends up stored exactly once, none lost, none twice."""

from __future__ import annotations

import collections
import signal
import subprocess

import pytest

from optuna_rq.client import BrokerClient
from optuna_rq.protocol import Keys
from tests.support.cluster import Cluster
from tests.support.helpers import wait_until

pytestmark = pytest.mark.timeout(600)

N_SETS = 40_000  # 20 commands: several turns to take, many more to store


def _where(cluster: Cluster, name: str) -> tuple[int, int, int]:
    """Where the enqueue stands: commands not taken, commands pending, the cursor."""
    keys = Keys(cluster.prefix)
    cursor = cluster.conn.hget(keys.backlog, name)
    return (
        int(cluster.conn.llen(keys.commands)),
        int(cluster.conn.llen(keys.backlog_of(name))),
        int(cursor or 0),
    )


def _killed(process: subprocess.Popen[bytes]) -> None:
    assert process.wait(timeout=120) == -signal.SIGKILL


def test_a_broker_killed_mid_enqueue_stores_every_set_once(cluster: Cluster) -> None:
    # No worker serves the study's queue: its one trial waits, sampled in [0, 1), and the sets
    # (2 and up, 1e-4 apart relatively) are all stored, none run.
    name = cluster.submit("steady", n_trials=1_000_000, concurrency=1, extra=("--queue", "nobody"))
    broker = cluster.start_broker(failpoints="after_slice=5")  # stored, flushed, cursor not moved
    sets = [{"x": 2 * 1.0001**i} for i in range(N_SETS)]
    client = BrokerClient(cluster.conn, cluster.prefix)
    commands = client.enqueue_commands(name, sets)
    client.send(*commands)
    _killed(broker)
    # Dies right after it moved a command onto the backlog (and trimmed the inbox up to it);
    # then after a later slice.
    for failpoint in ("after_take=2", "after_slice=20"):
        _killed(cluster.start_broker(failpoints=failpoint))
    for _ in range(3):  # and anywhere, from outside, once it made progress
        before = _where(cluster, name)
        broker = cluster.start_broker()
        wait_until(lambda before=before: _where(cluster, name) != before, timeout_s=60)
        broker.send_signal(signal.SIGKILL)
        _killed(broker)
    assert _where(cluster, name) != (0, 0, 0), "the enqueue was done before the last kill"

    cluster.start_broker()
    wait_until(lambda: _where(cluster, name) == (0, 0, 0), timeout_s=300, interval_s=0.2)
    stored = collections.Counter(
        t.system_attrs["fixed_params"]["x"]
        for t in cluster.trials(name)
        if "fixed_params" in t.system_attrs
    )
    assert set(stored.values()) == {1}, [x for x, n in stored.items() if n > 1][:10]
    assert stored.keys() == {s["x"] for s in sets}, len(stored)
    # Every command has its receipt, its sets all accounted for: none dropped or refused (those
    # a killed broker stored before its cursor moved count as there already, or as `earlier`).
    receipts = client.receipts(commands)
    assert receipts.keys() == {c.id for c in commands}
    assert all(receipts[c.id].items == len(c.params) for c in commands)
    assert not any(r.dropped or r.refused for r in receipts.values())
    assert sum(r.new + r.earlier for r in receipts.values()) > 0
