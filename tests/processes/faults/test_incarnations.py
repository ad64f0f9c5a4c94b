"""Names of one incarnation: nothing a worker or the broker left behind for one study (a reply
on its way to a killed worker, a cancel mark) is taken by another study, or by a study of the
same name submitted again after a delete, or after it ended (a storage that failed and came
back without its last trials numbers them again)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import warnings

import optuna
import pytest
import redis
from optuna.trial import TrialState

from optuna_rq.client import BrokerClient
from optuna_rq.plumbing.embedded import server_executable
from optuna_rq.protocol import CALL_FIELD, AttemptId, Delete, Keys, StudySpec
from optuna_rq.storage.storage_access import open_storage
from optuna_rq.study.verdict import FAIL_REASON_ATTR
from tests.support.cluster import Cluster, kill_tree, wait_calls
from tests.support.helpers import wait_until

pytestmark = pytest.mark.timeout(300)

REPEATS = 3


class TcpRedis:
    """A redis-server on a TCP port without persistence: a study's storage, that a test stops
    and starts again empty (on the same port: the same storage URL)."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.directory = tempfile.mkdtemp(prefix="orqs", dir="/tmp")
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        exe = server_executable()  # the embedded server's binary, or one on PATH
        self.process = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--dir", self.directory],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=1)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(answers, timeout_s=15, message="the storage's redis-server did not start")
        client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def _delete(cluster: Cluster, name: str) -> None:
    """`optuna-rq delete NAME --purge`, applied."""
    BrokerClient(cluster.conn, cluster.prefix).send(Delete(study=name, force=False, purge=True))
    wait_until(lambda: not cluster.status(name), timeout_s=30, message=f"{name} not deleted")


def _call_in_stream(cluster: Cluster) -> bool:
    """Whether a remote trial's call waits in the broker's result stream."""
    entries = cluster.conn.xrange(Keys(cluster.prefix).results)
    return any(CALL_FIELD in fields for _id, fields in entries)


def _waiting_for_replies(cluster: Cluster) -> set[str]:
    """The Redis clients blocked in BLPOP (the only one here: a remote trial's)."""
    return {c["id"] for c in cluster.conn.client_list() if c["cmd"] == "blpop"}


def _stale_replies(cluster: Cluster) -> list[bytes]:
    return list(cluster.conn.scan_iter(match=f"{Keys(cluster.prefix).results}:call:*"))


def test_a_reply_left_by_a_killed_worker_is_never_taken_by_another_study(
    cluster: Cluster,
) -> None:
    broker = cluster.start_broker()
    cluster.start_workers(1)
    for round_ in range(REPEATS):
        # Study A's trial 0 makes its call while the broker is frozen, and its process is
        # killed before the broker, woken, answers: the reply waits for nobody.
        started = len(cluster.started())
        first = cluster.submit(
            "asks",
            n_trials=1,
            concurrency=1,
            extra=("--param", "gate=true", "--max-retries", "0"),
        )
        wait_calls(cluster, started + 1)
        pid, _parent = cluster.started()[-1]
        broker.send_signal(signal.SIGSTOP)
        try:
            cluster.conn.rpush(f"{cluster.key}:go", 1)
            wait_until(lambda: _call_in_stream(cluster), timeout_s=30, message="no call came")
            wait_until(lambda: _waiting_for_replies(cluster), timeout_s=30)
            waiting = _waiting_for_replies(cluster)
            kill_tree([pid])
            # Until Redis has dropped its connection, a killed process's BLPOP still takes
            # (and loses) what is pushed.
            wait_until(lambda w=waiting: not w & _waiting_for_replies(cluster), timeout_s=30)
        finally:
            broker.send_signal(signal.SIGCONT)
        cluster.wait_finished(first)
        assert _stale_replies(cluster), "the broker's answer to the killed call is not there"
        (lost,) = cluster.trials(first)
        assert lost.state is TrialState.FAIL and lost.user_attrs[FAIL_REASON_ATTR] == "worker_lost"

        # Study B's trial 0 makes the same call: its objective gets its own answer.
        second = cluster.submit("asks", n_trials=2, concurrency=1)
        trials = cluster.check(second, complete=2, cap=1, failed=0)
        for trial in trials:
            assert trial.value == trial.params["y"], (round_, trial.number, trial.params)
        assert cluster.conn.llen(_reply_list(cluster, first)) == 1  # A's answer, taken by none


def _reply_list(cluster: Cluster, study: str) -> str:
    """The reply list of `study`'s trial 0, attempt 1."""
    keys = Keys(cluster.prefix)
    spec = StudySpec.decode(cluster.conn.hget(keys.studies, study))  # type: ignore[arg-type]
    assert spec.incarnation is not None
    of = AttemptId(
        reply_to=keys.results,
        study=study,
        incarnation=spec.incarnation,
        trial_number=0,
        attempt=1,
    )
    return Keys.reply_list(of)


def test_a_study_deleted_and_submitted_again_runs_all_its_new_trials(cluster: Cluster) -> None:
    cluster.start_broker()
    cluster.start_workers(2)
    name = "again"
    for round_ in range(REPEATS):
        if round_:
            _delete(cluster, name)  # the last round's, finished
        started = len(cluster.started())
        cluster.submit("steady", n_trials=4, concurrency=2, hold_s=60, name=name)
        wait_calls(cluster, started + 2)  # both slots' trials run: each has a cancel mark
        BrokerClient(cluster.conn, cluster.prefix).cancel(name)
        wait_until(lambda: cluster.status(name).get("state") == "cancelled", timeout_s=30)
        _delete(cluster, name)

        cluster.submit("steady", n_trials=4, concurrency=2, hold_s=0.1, name=name)
        trials = cluster.check(name, complete=4, cap=2, failed=0)
        assert not [t.number for t in trials if t.state is not TrialState.COMPLETE], round_


def test_a_study_whose_storage_lost_its_trials_runs_them_all_when_submitted_again(
    cluster: Cluster,
) -> None:
    # Each round's storage is a redis-server on a port of its own (Optuna's JournalRedis).
    cluster.start_broker(args=("--allow-storage", "redis://127.0.0.1:*/0"))
    cluster.start_workers(2)
    for round_ in range(REPEATS):
        # A study's storage dies while its first trials run: the study fails, and the broker
        # cancels its attempts (their marks live an hour). The storage comes back empty, as a
        # journal whose disk filled comes back without its last trials.
        storage = TcpRedis()
        try:
            name = f"lost-{round_}"
            started = len(cluster.started())
            extra = ("--storage", storage.url)
            cluster.submit("steady", n_trials=50, concurrency=2, hold_s=1, name=name, extra=extra)
            wait_calls(cluster, started + 2)
            storage.stop()
            wait_until(lambda n=name: cluster.status(n).get("state") == "failed", timeout_s=60)
            storage.start()

            # Submitted again, it numbers its trials from 0 again: none is taken as cancelled.
            cluster.submit("steady", n_trials=4, concurrency=2, hold_s=1, name=name, extra=extra)
            wait_until(lambda n=name: cluster.status(n).get("state") != "failed", timeout_s=30)
            cluster.wait_finished(name)
            with warnings.catch_warnings():  # JournalRedis: experimental, and it says so
                warnings.simplefilter("ignore")
                study = optuna.load_study(study_name=name, storage=open_storage(storage.url))
            reasons = [t.user_attrs.get(FAIL_REASON_ATTR) for t in study.trials]
            assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4, (round_, reasons)
        finally:
            storage.remove()
