"""What the front doors and workers act on that the broker wrote, with signing on: a study's
status, a trial call's reply, a cancel mark. Each is forged or replayed into Redis, as anyone with
write access could, while a real broker, real workers and the real CLI run: `wait` and `status`
refuse a status the broker did not sign, a define-by-run trial drops the replies it cannot
verify and runs to COMPLETE, and a worker acts on no cancel mark but the broker's.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from optuna.trial import TrialState

from optuna_rq.protocol import (
    ENV_KEY,
    ENV_SECRET,
    KeyRing,
    Keys,
    Record,
    Role,
    Signer,
    StudyState,
    StudyStatus,
    TrialCall,
    TrialCallReply,
    generate_keyrings,
)
from optuna_rq.protocol.signing import _signed_bytes
from optuna_rq.study.verdict import FAIL_REASON_ATTR
from tests.support.cluster import Cluster, wait_calls
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, cli_env

pytestmark = pytest.mark.timeout(300)

SECRET = "a shared secret of 32 bytes, ok!"
REPEATS = 3
NOT_SIGNED = "is not signed by the broker"


# -- the cluster, signed ---------------------------------------------------------------------------


def sign(
    cluster: Cluster, *, secret: str | None = None, keys: dict[Role, KeyRing] | None = None
) -> None:
    """Sign what every process `cluster` starts from now on writes: all with one shared
    `secret`, or each role with its own key of `keys` (its token as OPTUNA_RQ_KEY)."""
    for role in Role:
        if secret is not None:
            cluster.role_env[role] = {ENV_SECRET: secret}
        elif keys is not None:
            cluster.role_env[role] = {ENV_KEY: keys[role].to_token()}


def argv(cluster: Cluster, *args: str) -> list[str]:
    """`optuna-rq ARGS...` on `cluster`'s Redis and prefix."""
    return cli("--redis-url", cluster.server.url, "--prefix", cluster.prefix, *args)


def client_env(cluster: Cluster) -> dict[str, str]:
    """The environment of a front door of `cluster`."""
    return cli_env(OPTUNA_RQ_STATE_DIR=str(cluster.state), **cluster.role_env.get(Role.CLIENT, {}))


# -- forgeries -----------------------------------------------------------------------------------


def finished_json(name: str, *, best: float = -1.0, n_trials: int = 30) -> bytes:
    """A `finished` status with a complete trial, as plain JSON: what `wait` would exit 0 on."""
    return (
        StudyStatus(
            name=name,
            state=StudyState.FINISHED,
            objective="tests.support.fault_objectives:asks",
            directions=["minimize"],
            n_trials=n_trials,
            concurrency=1,
            priority=1.0,
            complete=n_trials,
            ended=n_trials,
            best_value=best,
            best_params={"x": 0.0},
            storage="memory",
        )
        .to_json()
        .encode()
    )


def sealed_as(ring: KeyRing, record: Record, body: bytes, *, by: Role, bound_to: str) -> bytes:
    """`body` sealed as `record` with `ring`'s private key, in the envelope's own layout, naming
    `by` as its signer: what a holder of a worker or front door key could write (`Signer.seal`
    itself refuses to seal a record that role may not sign)."""
    ts = time.time()
    sig = ring.sign(_signed_bytes(record, by.value, bound_to, ts, body))
    envelope = {"r": record.value, "by": by.value, "ts": ts, "body": body, "sig": sig}
    packed: bytes = msgpack.packb(envelope, use_bin_type=True)
    return packed


def run_cli(
    cluster: Cluster, *args: str, timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """`optuna-rq ARGS...` as a front door of `cluster`, to its end."""
    return subprocess.run(
        argv(cluster, *args),
        env=client_env(cluster),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


class Following:
    """`optuna-rq wait` (or `submit --wait`) running as a front door of `cluster`, its stderr in
    a file the test reads while it runs."""

    def __init__(self, cluster: Cluster, log: Path, *args: str) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                argv(cluster, *args), env=client_env(cluster), stderr=out, stdout=out
            )

    def said(self) -> str:
        return self.log.read_text(errors="replace")

    def running(self) -> bool:
        return self.process.poll() is None

    def end(self, timeout_s: float = 90) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()


def refused(cluster: Cluster, kind: str) -> int:
    return int(cluster.conn.hget(Keys(cluster.prefix).refused, kind) or 0)


def status_key(cluster: Cluster) -> str:
    return Keys(cluster.prefix).status


def gated(cluster: Cluster, n_trials: int, *, name: str | None = None) -> str:
    """A study of `asks` trials, each waiting for the test's go before its call."""
    return cluster.submit(
        "asks", n_trials=n_trials, concurrency=1, extra=("--param", "gate=true"), name=name
    )


def go(cluster: Cluster, count: int = 1) -> None:
    cluster.conn.rpush(f"{cluster.key}:go", *([1] * count))


# -- status --------------------------------------------------------------------------------------


def test_wait_and_status_refuse_a_status_the_broker_did_not_sign(cluster: Cluster) -> None:
    sign(cluster, secret=SECRET)
    cluster.start_broker()
    cluster.start_workers(1)
    real = gated(cluster, 1)
    go(cluster)
    cluster.wait_finished(real)
    signed_real: Any = cluster.conn.hget(status_key(cluster), real)

    forgeries = {
        "ghost": finished_json("ghost"),  # plain JSON, for a study never submitted
        "other-secret": Signer(b"another secret, also 32 bytes!!!").seal(
            Record.STATUS, finished_json("other-secret"), bound_to="other-secret"
        ),
        "copy": signed_real,  # the broker's own signed status of another study, copied
    }
    for name, raw in forgeries.items():
        cluster.conn.hset(status_key(cluster), name, raw)
        done = run_cli(cluster, "wait", name)
        assert done.returncode == 1, (name, done.returncode, done.stderr)
        assert f"the status of study {name!r} {NOT_SIGNED}" in done.stderr, done.stderr

        detail = run_cli(cluster, "status", name)
        assert detail.returncode == 1 and NOT_SIGNED in detail.stderr, detail.stderr

    listed = run_cli(cluster, "status")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split()[1:] for line in listed.stdout.splitlines()[1:]}
    assert rows[real][0] == "finished"
    for name in forgeries:
        assert rows[name] == ["refused", "-", "-", "-", "-", "-"], listed.stdout
        assert f"the status of study {name!r} {NOT_SIGNED}" in listed.stderr

    as_json = run_cli(cluster, "status", "--json")
    entries = {e["name"]: e for e in json.loads(as_json.stdout)}
    assert entries[real]["state"] == "finished"
    for name in forgeries:
        assert entries[name]["state"] == "refused" and NOT_SIGNED in entries[name]["error"]
        assert "best_value" not in entries[name]

    only_refused = run_cli(cluster, "status", "--state", "refused", "--json")
    assert {e["name"] for e in json.loads(only_refused.stdout)} == set(forgeries)

    # A refused status says nothing, not even that its study ended: delete wants --force.
    kept = run_cli(cluster, "delete", "ghost")
    assert kept.returncode == 1 and "delete --force ghost" in kept.stderr, kept.stderr
    gone = run_cli(cluster, "delete", "--force", "ghost")
    assert gone.returncode == 0, gone.stderr
    assert not cluster.conn.hexists(status_key(cluster), "ghost")


def test_a_status_rewritten_while_wait_waits_does_not_release_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    sign(cluster, secret=SECRET)
    cluster.start_broker()
    cluster.start_workers(1)
    for round_ in range(REPEATS):
        started = len(cluster.started())
        name = gated(cluster, 2)
        wait_calls(cluster, started + 1)  # trial 0 runs, waiting for its go: nothing moves
        waiting = Following(cluster, tmp_path / f"wait-{round_}.log", "wait", name)
        forged = finished_json(name, best=-123.0, n_trials=2)

        def noticed(name: str = name, forged: bytes = forged, waiting: Following = waiting) -> bool:
            # Written again until `wait` has read it: a status the broker publishes meanwhile
            # would replace it.
            if cluster.conn.hget(status_key(cluster), name) != forged:
                cluster.conn.hset(status_key(cluster), name, forged)
            return "ignoring the status of study" in waiting.said() or not waiting.running()

        wait_until(noticed, timeout_s=60, message="wait never read the forged status")
        assert waiting.running(), waiting.said()  # not released by it
        assert NOT_SIGNED in waiting.said()

        go(cluster, 2)
        assert waiting.end() == 0, waiting.said()
        assert "finished: 2 trials" in waiting.said(), waiting.said()
        assert "-123" not in waiting.said()  # the forged best is never printed
        assert cluster.status(name)["complete"] == 2


def test_a_signed_status_of_an_earlier_run_does_not_end_wait(
    cluster: Cluster, tmp_path: Path
) -> None:
    sign(cluster, secret=SECRET)
    cluster.start_broker()
    cluster.start_workers(1)
    name = gated(cluster, 1)
    go(cluster)
    cluster.wait_finished(name)
    earlier: Any = cluster.conn.hget(status_key(cluster), name)  # signed: finished, 1 trial

    # Submitted again, it runs on as a new incarnation; its trial 1 waits for its go.
    started = len(cluster.started())
    resubmitted = Following(
        cluster,
        tmp_path / "submit.log",
        *("submit", "tests.support.fault_objectives:asks", "--study-name", name, "--n-trials", "2"),
        *("--concurrency", "1", "--sampler", "random", "--wait"),
        *("--param", "x={type: float, low: 0, high: 1}", "--param", "gate=true"),
        *("--param", f"redis_url={cluster.server.url}", "--param", f"key={cluster.key}"),
    )
    wait_calls(cluster, started + 1)
    waiting = Following(cluster, tmp_path / "wait.log", "wait", name)

    def noticed() -> bool:
        if cluster.conn.hget(status_key(cluster), name) != earlier:
            cluster.conn.hset(status_key(cluster), name, earlier)  # the replay, again
        return "another submission" in waiting.said() or not waiting.running()

    wait_until(noticed, timeout_s=60, message="wait never read the replayed status")
    assert waiting.running() and resubmitted.running(), (waiting.said(), resubmitted.said())

    go(cluster)
    assert waiting.end() == 0, waiting.said()
    assert resubmitted.end() == 0, resubmitted.said()
    for follower in (waiting, resubmitted):
        assert "finished: 2 trials" in follower.said(), follower.said()


def test_a_status_sealed_with_a_client_or_worker_key_is_refused(cluster: Cluster) -> None:
    rings = generate_keyrings()
    sign(cluster, keys=rings)
    cluster.start_broker()
    cluster.start_workers(1)
    real = gated(cluster, 1)
    go(cluster)
    cluster.wait_finished(real)  # the broker's own status opens with the client's key

    forgeries = {
        "by-client": sealed_as(
            rings[Role.CLIENT],
            Record.STATUS,
            finished_json("by-client"),
            by=Role.CLIENT,
            bound_to="by-client",
        ),
        "by-worker": sealed_as(
            rings[Role.WORKER],
            Record.STATUS,
            finished_json("by-worker"),
            by=Role.WORKER,
            bound_to="by-worker",
        ),
        # Naming the broker as its signer does not make a client key's signature the broker's.
        "as-broker": sealed_as(
            rings[Role.CLIENT],
            Record.STATUS,
            finished_json("as-broker"),
            by=Role.BROKER,
            bound_to="as-broker",
        ),
    }
    why = {
        "by-client": "signed by a client key; only a broker key signs one",
        "by-worker": "signed by a worker key; only a broker key signs one",
        "as-broker": "bad signature",
    }
    for name, raw in forgeries.items():
        cluster.conn.hset(status_key(cluster), name, raw)
        done = run_cli(cluster, "wait", name)
        assert done.returncode == 1, (name, done.stderr)
        assert NOT_SIGNED in done.stderr and why[name] in done.stderr, done.stderr

    listed = run_cli(cluster, "status", "--json")
    states = {e["name"]: e["state"] for e in json.loads(listed.stdout)}
    assert states == {real: "finished", **dict.fromkeys(forgeries, "refused")}


def test_the_broker_resumes_a_study_whose_status_was_forged_finished(cluster: Cluster) -> None:
    # A forged `finished` would make a restarted broker leave the study as ended: its trials
    # never run, its `wait` never returns.
    sign(cluster, secret=SECRET)
    broker = cluster.start_broker()
    cluster.start_workers(1)
    started = len(cluster.started())
    name = gated(cluster, 2)
    wait_calls(cluster, started + 1)
    broker.send_signal(signal.SIGTERM)
    assert broker.wait(timeout=60) == 0
    forged = finished_json(name, n_trials=2)
    cluster.conn.hset(status_key(cluster), name, forged)

    cluster.start_broker()
    wait_until(
        lambda: cluster.conn.hget(status_key(cluster), name) != forged,
        timeout_s=60,
        message="the restarted broker left the study as the forged status says: finished",
    )
    go(cluster, 2)
    trials = cluster.check(name, complete=2, cap=1)
    assert len(trials) == 2
    assert refused(cluster, "status") >= 1


# -- replies to trial calls ----------------------------------------------------------------------


def _lease_job_ids(cluster: Cluster) -> list[str]:
    """The job ids of the attempts whose lease is held now."""
    keys = Keys(cluster.prefix)
    head = f"{keys.results}:lease:"
    return [bytes(k).decode()[len(head) :] for k in cluster.conn.scan_iter(match=head + "*")]


def _the_running_job(cluster: Cluster) -> str:
    """The job id of the one attempt running now (the leases of the ones before are gone)."""
    wait_until(lambda: len(_lease_job_ids(cluster)) == 1, timeout_s=30, message="one lease")
    (job_id,) = _lease_job_ids(cluster)
    return job_id


def test_a_trial_drops_replies_it_cannot_verify_and_runs_to_complete(cluster: Cluster) -> None:
    rings = generate_keyrings()
    sign(cluster, keys=rings)
    broker = cluster.start_broker()
    cluster.start_workers(1)
    keys = Keys(cluster.prefix)
    for round_ in range(REPEATS):
        started = len(cluster.started())
        name = gated(cluster, 1)
        wait_calls(cluster, started + 1)
        job_id = _the_running_job(cluster)
        reply_list = f"{keys.results}:call:{job_id}"
        incarnation = job_id.split("-")[2]  # orq-<digest>-<incarnation>-<trial>-<attempt>
        before = refused(cluster, "reply")

        # The broker is frozen while the trial makes its call: the forgeries reach its list
        # before the broker's answer, and the trial takes each of them, waiting for its own.
        broker.send_signal(signal.SIGSTOP)
        try:
            go(cluster)
            call = TrialCall(
                study=name,
                incarnation=incarnation,
                trial_number=0,
                attempt=1,
                seq=1,
                method="suggest_float",
                args=["y", 0.0, 1.0],
                kwargs={},
                reply=True,
            )
            forged = TrialCallReply.to(call, ok=True, value=0.123, error=None).encode()
            forgeries = [
                b"junk",
                forged,  # unsigned
                sealed_as(rings[Role.WORKER], Record.REPLY, forged, by=Role.WORKER, bound_to=""),
            ]
            for raw in forgeries:
                cluster.conn.rpush(reply_list, raw)
            expected = before + len(forgeries)
            wait_until(
                lambda n=expected: refused(cluster, "reply") == n,
                timeout_s=30,
                message="the trial did not take and refuse the forged replies",
            )
        finally:
            broker.send_signal(signal.SIGCONT)

        (trial,) = cluster.check(name, complete=1, cap=1, failed=0)
        assert trial.value == trial.params["y"] != 0.123, (round_, trial.params, trial.value)


# -- cancel marks --------------------------------------------------------------------------------


def _cancel_mark(cluster: Cluster, job_id: str) -> str:
    return f"{Keys(cluster.prefix).results}:cancel:{job_id}"


def test_a_forged_cancel_mark_leaves_the_trial_running_and_a_real_cancel_stops_it(
    cluster: Cluster,
) -> None:
    rings = generate_keyrings()
    sign(cluster, keys=rings)
    cluster.start_broker()
    cluster.start_workers(1)

    started = len(cluster.started())
    name = gated(cluster, 1)
    wait_calls(cluster, started + 1)
    job_id = _the_running_job(cluster)
    mark = _cancel_mark(cluster, job_id)
    forgeries = [
        b"1",  # what the broker set before marks were signed
        sealed_as(rings[Role.WORKER], Record.CANCEL, b"1", by=Role.WORKER, bound_to=job_id),
        # The broker's own key, but for another attempt: a mark copied from another job.
        Signer(keyring=rings[Role.BROKER]).seal(Record.CANCEL, b"1", bound_to=job_id + "0"),
    ]
    for count, raw in enumerate(forgeries, start=1):
        cluster.conn.set(mark, raw, ex=600)
        wait_until(
            lambda c=count: refused(cluster, "cancel") >= c,
            timeout_s=30,
            message="the worker's supervisor did not read the forged mark",
        )
    # A mark Redis cannot GET (a list): refused like the others, and the renewals go on.
    cluster.conn.delete(mark)
    cluster.conn.rpush(mark, b"1")
    wait_until(
        lambda: refused(cluster, "cancel") >= len(forgeries) + 1,
        timeout_s=30,
        message="the worker's supervisor did not refuse a mark of another type",
    )
    go(cluster)
    (trial,) = cluster.check(name, complete=1, cap=1, failed=0)
    assert trial.state is TrialState.COMPLETE

    # A real cancel, by the front door's command and the broker's mark, still stops a trial.
    started = len(cluster.started())
    doomed = gated(cluster, 1)
    wait_calls(cluster, started + 1)
    done = run_cli(cluster, "cancel", doomed)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: cluster.status(doomed).get("state") == "cancelled", timeout_s=60)
    wait_until(lambda: [t.state for t in cluster.trials(doomed)] == [TrialState.FAIL], timeout_s=60)
    (cancelled,) = cluster.trials(doomed)
    assert cancelled.user_attrs[FAIL_REASON_ATTR] == "cancelled"


@pytest.mark.parametrize("kind", ["string", "list"])
def test_a_forged_cancel_mark_on_a_queued_trial_does_not_stop_it_starting(
    cluster: Cluster, kind: str
) -> None:
    sign(cluster, keys=generate_keyrings())
    cluster.start_broker()
    name = cluster.submit("steady", n_trials=1, concurrency=1, hold_s=0.05)
    queue = f"rq:queue:{Keys(cluster.prefix).trial_queue('tests.support.fault_objectives')}"
    wait_until(lambda: cluster.conn.llen(queue) == 1, timeout_s=60, message="no job queued")
    (job_id,) = (bytes(j).decode() for j in cluster.conn.lrange(queue, 0, -1))
    if kind == "string":
        cluster.conn.set(_cancel_mark(cluster, job_id), b"1", ex=600)
    else:  # a key the trial's GET of its mark fails on (WRONGTYPE)
        cluster.conn.rpush(_cancel_mark(cluster, job_id), b"1")

    cluster.start_workers(1)
    (trial,) = cluster.check(name, complete=1, cap=1, failed=0)
    assert trial.state is TrialState.COMPLETE
    assert refused(cluster, "cancel") >= 1  # by the trial's process, and by its supervisor
