"""Replayed commands change nothing: a real broker, real workers, the real command line.

Whoever can write to Redis can copy a command off `<prefix>:commands` and push it back later:
signed or not, it is the very command the operator sent. Here the copy is taken with the broker
stopped (the command waits in the inbox, then the broker is started and applies it), and pushed
back once the operator has moved on. The broker refuses it as a replay (`replayed command` in
`<prefix>:refused`) and nothing changes, with signing off and with a shared secret (a replay is
validly signed: that is the point), and after a restart too: the ids of the commands applied are
kept in the broker's state directory, where Redis write access does not reach.

And a broker killed after its ledger was written but before the inbox was trimmed applies each
command once at its next start: not twice, and not refused as a replay of itself.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
from optuna.trial import TrialState

from optuna_rq.protocol import ENV_SECRET, Keys, Role
from tests.support.cluster import Cluster
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, cli_env

pytestmark = pytest.mark.timeout(240)

SECRET = "replays-0123456789abcdef0123456"


@pytest.fixture(params=["unsigned", "signed"])
def signing(request: pytest.FixtureRequest, cluster: Cluster) -> str:
    """Every process of the cluster signs with one secret, or none does."""
    if request.param == "signed":
        cluster.role_env = {role: {ENV_SECRET: SECRET} for role in Role}
    return str(request.param)


def front_door(cluster: Cluster, *args: str) -> str:
    """`optuna-rq ARGS...` as the operator runs it; its stdout."""
    done = subprocess.run(
        cli("--redis-url", cluster.server.url, "--prefix", cluster.prefix, *args),
        env=cli_env(
            OPTUNA_RQ_STATE_DIR=str(cluster.state), **cluster.role_env.get(Role.CLIENT, {})
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def stop_broker(cluster: Cluster) -> None:
    broker = cluster.brokers[-1]
    broker.send_signal(signal.SIGTERM)
    assert broker.wait(timeout=30) == 0
    wait_until(lambda: not cluster.conn.exists(f"{cluster.prefix}:broker"), timeout_s=10)


def copied(cluster: Cluster, *args: str) -> bytes:
    """Send a command with `optuna-rq ARGS...` while no broker runs, copy it off the inbox (what
    a replay pushes back), then start the broker, which applies it."""
    stop_broker(cluster)
    front_door(cluster, *args)
    [raw] = cluster.conn.lrange(Keys(cluster.prefix).commands, 0, -1)
    cluster.start_broker()
    wait_until(lambda: not cluster.conn.llen(Keys(cluster.prefix).commands), timeout_s=30)
    return bytes(raw)


def refused(cluster: Cluster) -> dict[str, int]:
    stored = cluster.conn.hgetall(Keys(cluster.prefix).refused)
    return {bytes(k).decode(): int(v) for k, v in stored.items()}  # type: ignore[union-attr]


def replay(cluster: Cluster, raw: bytes) -> None:
    """Push `raw` back onto the inbox; return once the broker has taken it (and refused it)."""
    before = refused(cluster).get("replayed command", 0)
    cluster.conn.rpush(Keys(cluster.prefix).commands, raw)
    wait_until(lambda: not cluster.conn.llen(Keys(cluster.prefix).commands), timeout_s=30)
    assert refused(cluster) == {"replayed command": before + 1}


def test_a_replayed_delete_purge_leaves_the_resubmitted_study_its_trials(
    cluster: Cluster, signing: str
) -> None:
    cluster.start_broker()
    cluster.start_workers(1)
    name = cluster.submit("steady", n_trials=2, concurrency=1, hold_s=0.05)
    cluster.wait_finished(name)
    purge = copied(cluster, "delete", name, "--purge")
    wait_until(lambda: cluster.status(name) == {}, timeout_s=30)

    cluster.submit("steady", n_trials=4, concurrency=1, hold_s=0.05, name=name)
    cluster.wait_finished(name)
    stop_broker(cluster)  # the ledger outlives the broker: it is on its disk, not in Redis
    cluster.start_broker()
    replay(cluster, purge)

    assert cluster.status(name)["state"] == "finished"
    assert [t.state for t in cluster.trials(name)] == [TrialState.COMPLETE] * 4


def test_a_replayed_cancel_leaves_the_resubmitted_study_running(
    cluster: Cluster, signing: str
) -> None:
    cluster.start_broker()
    cluster.start_workers(1)
    name = cluster.submit("steady", n_trials=30, concurrency=1, hold_s=0.2)
    cancel = copied(cluster, "cancel", name)
    wait_until(lambda: cluster.status(name).get("state") == "cancelled", timeout_s=30)

    cluster.submit("steady", n_trials=30, concurrency=1, hold_s=0.2, name=name)  # it runs on
    wait_until(lambda: cluster.status(name).get("state") == "running", timeout_s=30)
    replay(cluster, cancel)

    assert cluster.status(name)["state"] == "running"  # a cancel publishes its state at once
    cluster.wait_finished(name)  # to its budget, not cancelled


def test_a_replayed_set_leaves_the_study_as_the_operator_set_it_last(
    cluster: Cluster, signing: str
) -> None:
    cluster.start_broker()
    cluster.start_workers(2)
    name = cluster.submit("steady", n_trials=1000, concurrency=1, hold_s=0.2)  # cancelled
    wider = copied(cluster, "set", name, "--concurrency", "2")
    wait_until(lambda: cluster.status(name).get("concurrency") == 2, timeout_s=30)
    front_door(cluster, "set", name, "--concurrency", "1")  # the operator's last word
    wait_until(lambda: cluster.status(name).get("concurrency") == 1, timeout_s=30)

    replay(cluster, wider)
    # A command after it, to know the status the broker publishes next follows the replay.
    front_door(cluster, "set", name, "--priority", "3")
    wait_until(lambda: cluster.status(name).get("priority") == 3, timeout_s=30)
    assert cluster.status(name)["concurrency"] == 1
    assert cluster.status(name)["state"] == "running"
    front_door(cluster, "cancel", name)


def test_a_broker_killed_between_its_ledger_and_the_trim_applies_each_command_once(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Killed with the submission and its enqueued sets taken (their ids durable) and not yet
    trimmed: the next broker finds them in doubt, not replayed. The submission was applied: it
    is trimmed; the enqueue never reached its backlog: it is applied, once."""
    sets = tmp_path / "sets.json"
    sets.write_text(json.dumps([{"x": 0.125}, {"x": 0.375}]))
    first = cluster.start_broker(failpoints="after_ledger=1")
    cluster.start_workers(1)
    name = cluster.submit(
        "steady", n_trials=3, concurrency=1, hold_s=0.05, extra=("--enqueue", str(sets))
    )
    assert first.wait(timeout=30) == -signal.SIGKILL
    assert cluster.conn.llen(Keys(cluster.prefix).commands) == 2  # neither was trimmed

    cluster.start_broker()
    trials = cluster.check(name, complete=3, cap=1)
    enqueued = [t.system_attrs["fixed_params"] for t in trials if "fixed_params" in t.system_attrs]
    assert enqueued == [{"x": 0.125}, {"x": 0.375}]
    assert refused(cluster) == {}
