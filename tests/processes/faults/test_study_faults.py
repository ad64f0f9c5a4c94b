"""One study's fault is that study's alone: the fault boundary, site by site.

Every site of `optuna_rq.dispatch.boundary.Site` is a failpoint. One broker runs a study per site
whose failpoint raises (as a bug in our code or in Optuna would), beside a normal study: the
broker process lives on, each faulted study ends FAILED naming its site and error, its trials
end (none RUNNING, each told once), and the normal study is exact. A broker restarted with the
faulted specs stored comes up and serves. A site added to `Site` is in this test by existing;
if nothing here reaches it, the test fails until something does.
"""

from __future__ import annotations

import collections
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from optuna.trial import TrialState

from optuna_rq.dispatch.boundary import Site
from tests.support.cluster import Cluster
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, cli_env

FAULTED = {site: f"faulty-{site.value}" for site in Site}
"""The study that faults at each site."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli("--redis-url", cluster.server.url, "--prefix", cluster.prefix, *args),
        env=cli_env(OPTUNA_RQ_STATE_DIR=str(cluster.state)),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _wait(predicate: Callable[[], object], log: Path, what: str) -> None:
    try:
        wait_until(predicate, timeout_s=120, message=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nthe broker's log:\n{log.read_text()}") from None


def _ended_once(cluster: Cluster, name: str) -> collections.Counter[TrialState]:
    """The study's trials by state, after checking none is left RUNNING or told twice."""
    trials = cluster.trials(name)
    tells = cluster.tells()
    states = collections.Counter(t.state for t in trials)
    assert states[TrialState.RUNNING] == 0 == states[TrialState.WAITING], (name, states)
    assert all(tells[t._trial_id] == 1 for t in trials), (name, tells)
    return states


@pytest.mark.timeout(300)
def test_a_fault_at_any_site_fails_that_study_alone(cluster: Cluster, tmp_path: Path) -> None:
    armed = ",".join(f"{site.value}@{name}=1:raise" for site, name in FAULTED.items())
    log = tmp_path / "broker.log"
    cluster.start_workers(3)
    broker = cluster.start_broker(
        failpoints=armed, log=log, args=("--metrics-port", str(_free_port()))
    )
    normal = cluster.submit("steady", n_trials=24, concurrency=2, hold_s=0.05)
    for site, name in FAULTED.items():
        # WITHDRAW is reached by cancelling: its trials must still be running then.
        # Long enough for the periodic sites (leases, metrics, status) to come round.
        hold_s = 5.0 if site is Site.WITHDRAW else 0.4
        cluster.submit("with_trial", name=name, n_trials=3, concurrency=1, hold_s=hold_s)
    withdrawing = FAULTED[Site.WITHDRAW]
    _wait(lambda: cluster.status(withdrawing).get("running"), log, f"{withdrawing} runs")
    cancelled = _cli(cluster, "cancel", withdrawing)
    assert cancelled.returncode == 0, cancelled.stderr

    def failed() -> set[str]:
        return {name for name in FAULTED.values() if cluster.status(name)["state"] == "failed"}

    _wait(lambda: failed() == set(FAULTED.values()), log, "every faulty study failed")
    cluster.check(normal, complete=24, cap=2)
    assert broker.poll() is None, log.read_text()  # the same broker process served them all

    text = log.read_text()
    for site, name in FAULTED.items():
        status = cluster.status(name)
        error = status["error"]
        assert f"FailpointError: failpoint {site.value}@{name}" in error, (site, error)
        assert f"while the broker did '{site.value}'" in error, (site, error)
        # Logged once, with its traceback.
        assert text.count(f"study {name!r} failed at {site.value}:") == 1, (site, text)
        if site not in (Site.START, Site.COMMAND):  # those two never reached its storage
            states = _ended_once(cluster, name)
            assert status["complete"] == states[TrialState.COMPLETE], (site, status, states)
    assert cluster.status(FAULTED[Site.END])["complete"] == 3  # it told its budget, then failed
    assert "Traceback" in text

    # A broker restarted with the faulted studies stored starts, and serves.
    broker.terminate()
    assert broker.wait(timeout=30) == 0, log.read_text()
    cluster.start_broker(log=tmp_path / "restarted.log")
    after = cluster.submit("steady", n_trials=6, concurrency=2, hold_s=0.02)
    cluster.check(after, complete=6, cap=2)
    assert all(cluster.status(name)["state"] == "failed" for name in FAULTED.values())


def test_an_infeasible_constrained_study_runs_to_its_end_across_a_restart(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A single-objective study whose trials all violate their constraint has COMPLETE trials
    and no best one (Optuna's best_trial raises): its status says so, and neither the broker
    running it nor one restarted while it runs stops."""
    cluster.start_workers(2)
    broker = cluster.start_broker(log=tmp_path / "broker.log")
    name = cluster.submit("infeasible", n_trials=12, concurrency=2, hold_s=0.1)
    wait_until(lambda: cluster.status(name).get("complete", 0) >= 2, timeout_s=60)
    assert broker.poll() is None, (tmp_path / "broker.log").read_text()
    broker.terminate()
    assert broker.wait(timeout=30) == 0
    restarted = cluster.start_broker(log=tmp_path / "restarted.log")
    cluster.check(name, complete=12, cap=2)
    status = cluster.status(name)
    assert status["state"] == "finished" and status.get("best_value") is None, status
    assert restarted.poll() is None, (tmp_path / "restarted.log").read_text()


def test_a_misspelt_function_fails_its_study_and_nothing_else(
    cluster: Cluster, tmp_path: Path
) -> None:
    """`module:nofunc` fails every trial at once, so the broker cancels the study while workers
    are still taking and finishing its jobs: a withdrawal that races a worker (the job dequeued
    or finished between looking and cancelling) must change nothing. Many at once, many times."""
    log = tmp_path / "broker.log"
    cluster.start_workers(3)
    broker = cluster.start_broker(log=log)
    names = [
        cluster.submit("nofunc", n_trials=40, concurrency=4, name=f"typo-{i}", from_elsewhere=True)
        for i in range(8)
    ]
    normal = cluster.submit("steady", n_trials=10, concurrency=2, hold_s=0.02)
    _wait(
        lambda: all(cluster.status(name).get("state") == "failed" for name in names),
        log,
        "every misspelt study failed",
    )
    cluster.check(normal, complete=10, cap=2)
    assert broker.poll() is None, log.read_text()
    for name in names:
        status = cluster.status(name)
        assert "nofunc" in status["error"], status
        assert _ended_once(cluster, name)[TrialState.COMPLETE] == 0
