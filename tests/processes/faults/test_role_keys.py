"""A key per role, with real processes: the broker signs as the broker, the workers as workers,
the command line as a front door (`optuna-rq keys` makes the set; each process gets its own
role's key in OPTUNA_RQ_KEY).

A worker machine broken into holds the worker key: it cannot make the broker apply a command,
whichever role its forged envelope claims. And a study runs end to end on role keys: submitted
with `--wait`, its define-by-run calls served, its timed-out trial reported by the worker's
supervisor, each result and call with its attempt's token; and a remote Optimizer, which
dispatches with the client key, runs on the same workers.
"""

from __future__ import annotations

import time

import msgpack
import optuna
import pytest
from optuna.trial import TrialState

from optuna_rq import Optimizer, suggest
from optuna_rq.protocol import ENV_KEY, Keys, Record, Role, StudySpec, Submit, generate_keyrings
from optuna_rq.protocol.signing import _signed_bytes
from optuna_rq.study.verdict import FAIL_REASON_ATTR
from tests.support.cluster import Cluster
from tests.support.helpers import wait_until

pytestmark = pytest.mark.timeout(240)

RINGS = generate_keyrings()


@pytest.fixture
def keyed(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    """`cluster` with a broker and two workers on their role keys; the front doors, and this
    process (the remote Optimizer), hold the client key."""
    cluster.role_env = {role: {ENV_KEY: RINGS[role].to_token()} for role in Role}
    monkeypatch.setenv(ENV_KEY, RINGS[Role.CLIENT].to_token())
    cluster.start_broker()
    cluster.start_workers(2)
    return cluster


def refused(cluster: Cluster) -> dict[str, int]:
    stored = cluster.conn.hgetall(Keys(cluster.prefix).refused)
    return {bytes(k).decode(): int(v) for k, v in stored.items()}  # type: ignore[union-attr]


def forged_by_a_worker(body: bytes, claimed: Role) -> bytes:
    """A command envelope signed with the worker's private key, claiming `claimed` as its
    signer: the worker key's `seal` refuses to sign a command, so it is made by hand."""
    ts = time.time()
    signature = RINGS[Role.WORKER].sign(_signed_bytes(Record.COMMAND, claimed.value, "", ts, body))
    envelope = {"r": Record.COMMAND.value, "by": claimed.value, "ts": ts, "body": body}
    packed: bytes = msgpack.packb({**envelope, "sig": signature}, use_bin_type=True)
    return packed


def test_a_command_signed_with_a_worker_key_is_refused_and_the_client_keys_applied(
    keyed: Cluster,
) -> None:
    cluster = keyed
    spec = StudySpec(
        name="forged",
        objective="tests.support.fault_objectives:steady",
        space={"x": {"type": "float", "low": 0.0, "high": 1.0}},
        n_trials=1,
        concurrency=1,
    )
    body = Submit(spec=spec).encode()
    commands = Keys(cluster.prefix).commands
    cluster.conn.rpush(commands, *(forged_by_a_worker(body, r) for r in (Role.CLIENT, Role.WORKER)))
    wait_until(lambda: not cluster.conn.llen(commands), timeout_s=30)
    assert refused(cluster) == {"command": 2}
    assert cluster.status("forged") == {}
    assert not cluster.conn.hexists(Keys(cluster.prefix).studies, "forged")

    # The front door's own command, sealed with the client key, is applied.
    name = cluster.submit("steady", n_trials=3, concurrency=2, hold_s=0.05)
    cluster.check(name, complete=3, cap=2)
    assert refused(cluster) == {"command": 2}


def test_a_study_runs_end_to_end_on_role_keys(keyed: Cluster) -> None:
    cluster = keyed
    name = cluster.submit("with_trial", n_trials=6, concurrency=2, extra=("--wait",))
    trials = cluster.check(name, complete=6, cap=2)
    assert all(t.user_attrs["x"] == t.params["x"] for t in trials)  # the calls were served

    # Killed at its timeout by the worker's supervisor, which reports it in the trial's stead.
    stuck = cluster.submit("stuck_in_c", n_trials=1, concurrency=1, extra=("--trial-timeout", "1"))
    cluster.wait_finished(stuck)
    [trial] = cluster.trials(stuck)
    assert trial.state is TrialState.FAIL and trial.user_attrs[FAIL_REASON_ATTR] == "timeout"

    # A remote Optimizer dispatches its own trials, signed with the client key.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    optimizer = Optimizer(
        "tests.support.fault_objectives:with_trial",
        concurrency=2,
        n_trials=4,
        study=study,
        redis_url=cluster.server.url,
        prefix=cluster.prefix,
    )
    optimizer.run(x=suggest.float(0, 1), redis_url=cluster.server.url, key=cluster.key)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    assert refused(cluster) == {}
