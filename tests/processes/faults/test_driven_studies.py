"""A remote Optimizer's study is a study like the others: `optuna-rq status`, `wait` and `best`
see it from the command line (signed with the client key the Optimizer holds, read with any
role's key), marked with the Python process that runs it; `wait` exits 3 once that process is
killed; a broker on the same prefix neither adopts nor deletes it, and a name is never both the
broker's and an Optimizer's; `trial_timeout` and `max_retries` mean what `submit`'s options
mean; a progress bar shows on a terminal and nowhere else.

Real processes throughout: workers started by the CLI, the CLI as a subprocess, the Optimizer in
a thread of the test or in a process of its own (`tests.support.driven_optimizer`).
"""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from optuna_rq import ConfigError, Optimizer, suggest
from optuna_rq.dispatch import ATTEMPT_ATTR
from optuna_rq.errors import StudyConflictError
from optuna_rq.protocol import ENV_KEY, Keys, Role, generate_keyrings, trial_queue
from optuna_rq.study.verdict import FAIL_ERROR_ATTR, FAIL_REASON_ATTR
from tests.support.cluster import Cluster, OptimizerRun, wait_calls
from tests.support.helpers import wait_until
from tests.support.worker_processes import PROJECT_ROOT, cli, cli_env

pytestmark = pytest.mark.timeout(240)

RINGS = generate_keyrings()
HERE = f"{socket.gethostname()}:{os.getpid()}"
"""What the status of a study a remote Optimizer of this process runs names as its driver."""


_RUNNING: list[Callable[[], None]] = []
"""How to cancel each Optimizer a test started in a thread (`optimizer_in_thread`)."""


@pytest.fixture
def keyed(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    """`cluster` on role keys, with two workers and no broker: the Optimizers of this process
    hold the client key. An Optimizer a failed test left running is cancelled at the end."""
    cluster.role_env = {role: {ENV_KEY: RINGS[role].to_token()} for role in Role}
    monkeypatch.setenv(ENV_KEY, RINGS[Role.CLIENT].to_token())
    cluster.start_workers(2)
    yield cluster
    while _RUNNING:
        _RUNNING.pop()()


def run_cli(
    cluster: Cluster, *args: str, role: Role = Role.WORKER
) -> subprocess.CompletedProcess[str]:
    """`optuna-rq ARGS` on the cluster's prefix, holding `role`'s key (by default the workers':
    a command that only reads verifies with any role's key)."""
    return subprocess.run(
        cli("--redis-url", cluster.server.url, "--prefix", cluster.prefix, *args),
        env=cli_env(OPTUNA_RQ_STATE_DIR=str(cluster.state), **cluster.role_env.get(role, {})),
        capture_output=True,
        text=True,
        timeout=120,
    )


def start_cli(cluster: Cluster, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cli("--redis-url", cluster.server.url, "--prefix", cluster.prefix, *args),
        env=cli_env(
            OPTUNA_RQ_STATE_DIR=str(cluster.state), **cluster.role_env.get(Role.WORKER, {})
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def optimizer_in_thread(
    cluster: Cluster,
    name: str,
    *,
    n_trials: int,
    hold_s: float,
    objective: str = "steady",
    **options: Any,
) -> OptimizerRun:
    """A remote Optimizer of `objective` (tests.support.fault_objectives) running in a thread, with
    its study named `name`."""
    study = optuna.create_study(study_name=name, sampler=optuna.samplers.RandomSampler())
    optimizer = Optimizer(
        f"tests.support.fault_objectives:{objective}",
        concurrency=2,
        n_trials=n_trials,
        study=study,
        redis_url=cluster.server.url,
        prefix=cluster.prefix,
        **options,
    )
    errors: list[BaseException] = []
    inputs = {"redis_url": cluster.server.url, "key": cluster.key}
    if objective == "steady":
        inputs["hold_s"] = hold_s

    started = threading.Event()
    loop: list[tuple[asyncio.AbstractEventLoop, asyncio.Task[None]]] = []

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop.append((asyncio.get_running_loop(), task))  # type: ignore[arg-type]
        started.set()
        await optimizer(x=suggest.float(0, 1), **inputs)

    def run() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # the test reads it
            errors.append(exc)
        finally:
            started.set()

    def cancel() -> None:
        if thread.is_alive() and loop:
            loop[0][0].call_soon_threadsafe(loop[0][1].cancel)
        thread.join(timeout=60)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(timeout=30)
    _RUNNING.append(cancel)
    return OptimizerRun(study, thread, errors)


def listed(cluster: Cluster, name: str) -> str:
    """The line `optuna-rq status` prints for study `name` ('' if none)."""
    done = run_cli(cluster, "status")
    assert done.returncode == 0, done.stderr
    return next((line for line in done.stdout.splitlines() if line.split()[:1] == [name]), "")


def test_status_wait_best_and_trials_follow_a_remote_optimizer_with_no_broker(
    keyed: Cluster,
) -> None:
    """No broker runs: the Optimizer drives its study itself. `status` lists it running, marked
    with this process; `status --json` names it and judges it alive; `wait` follows it to its
    end and exits 0; `best` prints its best trial and `trials` its trials. The CLI holds the
    workers' key."""
    name = f"driven-{uuid.uuid4().hex[:6]}"
    run = optimizer_in_thread(keyed, name, n_trials=8, hold_s=0, objective="gated")
    wait_until(
        lambda: f"running (optimizer {HERE})" in listed(keyed, name),
        timeout_s=60,
        message="status never listed the Optimizer's study as running",
    )
    [entry] = [
        s for s in json.loads(run_cli(keyed, "status", "--json").stdout) if s["name"] == name
    ]
    assert entry["driver"] == HERE and entry["state"] == "running", entry
    assert entry["driver_liveness"]["state"] == "running", entry
    assert "broker" not in entry, entry  # no broker moves it: none is asked after
    follower = start_cli(keyed, "wait", name)
    keyed.conn.set(f"{keyed.key}:open", 1)
    _out, err = follower.communicate(timeout=120)
    assert follower.returncode == 0, err
    assert f"study {name!r} finished: 8 trials" in err, err
    assert run.finished() == [TrialState.COMPLETE] * 8

    assert listed(keyed, name).split()[1:4] == ["finished", "(optimizer", f"{HERE})"]
    detail = run_cli(keyed, "status", name).stdout
    assert f"driven by    the Optimizer on {HERE}" in detail, detail
    best = json.loads(run_cli(keyed, "best", name, "--json").stdout)
    assert best == {"value": run.study.best_value, "params": run.study.best_params}
    # Its trials, as the Optimizer published them: what its own study holds.
    shown = json.loads(run_cli(keyed, "trials", name, "--format", "json").stdout)
    expected = [(t.number, "complete", t.values, t.params) for t in run.study.trials]
    assert [(t["number"], t["state"], t["values"], t["params"]) for t in shown] == expected
    again = start_cli(keyed, "wait", name)  # an ended study: at once
    assert again.wait(timeout=60) == 0


def start_driven_process(
    cluster: Cluster, name: str, *, n_trials: int, hold_s: float, progress: str = "auto", **kw: Any
) -> subprocess.Popen[bytes]:
    args = [cluster.server.url, cluster.prefix, name, str(n_trials), str(hold_s), cluster.key]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.support.driven_optimizer", *args, progress],
        env=cli_env(**cluster.role_env.get(Role.CLIENT, {}), **kw.pop("env", {})),
        cwd=PROJECT_ROOT,
        **kw,
    )


def test_wait_exits_3_once_the_optimizers_process_is_killed(keyed: Cluster) -> None:
    """Twice: a `wait` already following the study, then one started after the kill. Each
    exits 3 naming the process that stopped, and `status` marks it gone; the study stays
    `running` (nothing ends it but its Optimizer)."""
    for follow_first in (True, False):
        name = f"killed-{uuid.uuid4().hex[:6]}"
        before = len(keyed.started())
        driver = start_driven_process(keyed, name, n_trials=50, hold_s=0.5)
        wait_calls(keyed, before + 1)
        where = f"{socket.gethostname()}:{driver.pid}"
        wait_until(lambda: f"running (optimizer {where})" in listed(keyed, name), timeout_s=30)  # noqa: B023
        follower = start_cli(keyed, "wait", name) if follow_first else None
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        follower = follower or start_cli(keyed, "wait", name)
        _out, err = follower.communicate(timeout=90)
        assert follower.returncode == 3, err
        assert f"the Optimizer on {where} stopped" in err, err
        assert f"running (optimizer {where}, gone)" in listed(keyed, name)


def test_trial_timeout_and_max_retries_mean_what_submits_options_mean(keyed: Cluster) -> None:
    """The same hanging objective with a trial timeout of 1 s, and the same objective that
    exits its worker with max retries 1, through `submit` (a broker) and a remote Optimizer:
    the trials end alike (state, reason, attempt), and the retries' last error says why no
    more ran."""
    keyed.start_broker()
    ended: dict[str, list[tuple[str, str, Any]]] = {}

    def outcomes(trials: list[optuna.trial.FrozenTrial]) -> list[tuple[str, str, Any]]:
        return [
            (
                t.state.name,
                str(t.user_attrs.get(FAIL_REASON_ATTR)),
                t.user_attrs.get(ATTEMPT_ATTR, 1),
            )
            for t in sorted(trials, key=lambda t: t.number)
        ]

    for objective, option, value in (("steady", "trial-timeout", 1), ("exits", "max-retries", 1)):
        name = keyed.submit(
            objective,
            n_trials=1,
            concurrency=1,
            hold_s=600 if objective == "steady" else None,
            extra=(f"--{option}", str(value)),
        )
        keyed.wait_finished(name)
        submitted = outcomes(keyed.trials(name))
        run = optimizer_in_thread(
            keyed,
            f"{objective}-{uuid.uuid4().hex[:6]}",
            n_trials=1,
            hold_s=600,
            objective=objective,
            **{option.replace("-", "_"): value},
        )
        run.finished()
        ended[objective] = optimized = outcomes(run.study.trials)
        assert optimized == submitted, (objective, optimized, submitted)
        if objective == "exits":
            last = max(run.study.trials, key=lambda t: t.number)
            assert "not retried: 2 attempts, max retries 1" in last.user_attrs[FAIL_ERROR_ATTR]
    assert ended == {
        "steady": [("FAIL", "timeout", 1)],
        "exits": [("FAIL", "worker_lost", 1), ("FAIL", "worker_lost", 2)],
    }


def test_a_broker_on_the_prefix_keeps_its_names_apart_from_an_optimizers(keyed: Cluster) -> None:
    """With a broker serving the prefix: it neither adopts nor deletes the Optimizer's study
    (nothing of it in the broker's status or specs, its entry as the Optimizer left it after
    the broker turned, and after the broker restarted); broker commands for it are refused,
    naming its process; a submission of its name is refused while it runs and accepted once
    it ended (the broker's study then shows); and an Optimizer refuses a broker's study name
    before it sends anything."""
    keys = Keys(keyed.prefix)
    broker = keyed.start_broker()
    run = optimizer_in_thread(keyed, "shared", n_trials=6, hold_s=0, objective="gated")
    wait_until(lambda: "running (optimizer" in listed(keyed, "shared"), timeout_s=60)
    x = ("--param", "x={type: float, low: 0, high: 1}", "--n-trials", "1", "--concurrency", "1",
         "--param", f"redis_url={keyed.server.url}", "--param", f"key={keyed.key}")  # fmt: skip
    refused = run_cli(keyed, "submit", "tests.support.fault_objectives:steady",
                      "--study-name", "shared", *x, role=Role.CLIENT)  # fmt: skip
    assert refused.returncode != 0 and f"run by the Optimizer on {HERE}" in refused.stderr
    assert "which is running" in refused.stderr, refused.stderr
    for command in (("cancel", "shared"), ("set", "shared", "--concurrency", "1")):
        done = run_cli(keyed, *command, role=Role.CLIENT)
        assert done.returncode != 0, (command, done.stderr)
        assert f"run by the Optimizer on {HERE}" in done.stderr, (command, done.stderr)
    deleting = run_cli(keyed, "delete", "shared", "--force", role=Role.CLIENT)
    assert deleting.returncode != 0 and "stop that run in its process first" in deleting.stderr
    keyed.conn.set(f"{keyed.key}:open", 1)
    assert run.finished() == [TrialState.COMPLETE] * 6

    left = keyed.conn.hget(keys.driven, "shared")
    for _restart in range(2):  # the broker turns, then a new broker takes the prefix
        turned = keyed.conn.hget(keys.broker_turn, "at_s")
        wait_until(lambda: keyed.conn.hget(keys.broker_turn, "at_s") != turned, timeout_s=30)  # noqa: B023
        assert not keyed.conn.hexists(keys.status, "shared")
        assert not keyed.conn.hexists(keys.studies, "shared")
        assert keyed.conn.hget(keys.driven, "shared") == left
        broker.send_signal(signal.SIGTERM)
        broker.wait(timeout=30)
        broker = keyed.start_broker()
    assert not keyed.conn.hexists(keys.refused, "status")  # nothing of it read as the broker's

    # Ended: the name is free for the broker, whose study then shows under it.
    taken = run_cli(keyed, "submit", "tests.support.fault_objectives:steady",
                    "--study-name", "shared", *x, "--wait", role=Role.CLIENT)  # fmt: skip
    assert taken.returncode == 0, taken.stderr
    line = listed(keyed, "shared")
    assert "finished" in line and "optimizer" not in line, line
    assert keyed.conn.hget(keys.driven, "shared") == left  # kept apart, not rewritten
    trials = run_cli(keyed, "trials", "shared", "--format", "json")
    assert [t["state"] for t in json.loads(trials.stdout)] == ["complete"], trials.stderr
    assert keyed.conn.hlen(keys.driven_trials_of("shared")) == 6  # the Optimizer's, apart

    queue = trial_queue(keyed.conn, keys.trial_queue("tests.support.fault_objectives"))
    jobs = queue.count
    study = optuna.create_study(study_name="shared")
    clash = Optimizer(
        "tests.support.fault_objectives:steady", 1, 3, study=study, redis_url=keyed.server.url,
        prefix=keyed.prefix,
    )  # fmt: skip
    with pytest.raises(StudyConflictError, match="'shared' is a broker study"):
        clash.run(x=suggest.float(0, 1), redis_url=keyed.server.url, key=keyed.key)
    assert study.trials == [] and queue.count == jobs


def _read_all(fd: int, into: bytearray) -> Callable[[], None]:
    """Read `fd` (a pty's master) into `into` until the other side closes; returns the join."""

    def read() -> None:
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                return
            if not chunk:
                return
            into.extend(chunk)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return lambda: thread.join(timeout=30)


@pytest.mark.parametrize(
    ("stderr", "progress", "shows"),
    [("terminal", "auto", True), ("pipe", "auto", False), ("terminal", "off", False)],
)
def test_a_progress_bar_shows_on_a_terminal_only(
    keyed: Cluster, stderr: str, progress: str, shows: bool
) -> None:
    """A user's script running a remote Optimizer of 4 trials: with its stderr on a terminal
    the bar shows the study's name and `4/4`; on a pipe, or with progress=False, nothing."""
    name = f"bar-{uuid.uuid4().hex[:6]}"
    term = {"TERM": "xterm-256color", "COLUMNS": "160"}
    if stderr == "terminal":
        master, slave = pty.openpty()
        output = bytearray()
        join = _read_all(master, output)
        driver = start_driven_process(
            keyed, name, n_trials=4, hold_s=0.05, progress=progress, env=term,
            stdout=subprocess.PIPE, stderr=slave,
        )  # fmt: skip
        os.close(slave)
        out, _ = driver.communicate(timeout=120)
        join()
        os.close(master)
        shown = output.decode(errors="replace")
    else:
        driver = start_driven_process(
            keyed, name, n_trials=4, hold_s=0.05, progress=progress, env=term,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = driver.communicate(timeout=120)
        shown = err.decode(errors="replace")
    assert driver.returncode == 0 and out == b"finished 4\n", (out, shown)
    assert ("4/4" in shown and name in shown) is shows, shown
    assert ("━" in shown) is shows, shown
    if stderr == "pipe":
        assert "\x1b[" not in shown, shown


def test_n_trials_counts_per_call_and_the_status_counts_the_study(keyed: Cluster) -> None:
    """Two runs of one Optimizer with n_trials=3 ask 3 trials each, as flytekitplugins.optuna's
    `__call__` does (in-process too); the second run's status counts the study: 6/6. Then
    `delete` forgets it."""
    study = optuna.create_study(study_name=f"twice-{uuid.uuid4().hex[:6]}")
    url = keyed.server.url
    twice = Optimizer(
        "tests.support.fault_objectives:steady",
        2,
        3,
        study=study,
        redis_url=url,
        prefix=keyed.prefix,
    )
    for _ in range(2):
        twice.run(x=suggest.float(0, 1), redis_url=url, key=keyed.key, hold_s=0.05)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6
    status = keyed.client().status(study.study_name)
    assert status is not None and status.driven
    assert (status.state.value, status.done, status.n_trials) == ("finished", 6, 6)

    # Ended: `delete` forgets it, with no broker (its trials stay in the Optimizer's study).
    purge = run_cli(keyed, "delete", study.study_name, "--purge", role=Role.CLIENT)
    assert purge.returncode == 2 and "only its process reaches" in purge.stderr, purge.stderr
    deleted = run_cli(keyed, "delete", study.study_name, role=Role.CLIENT)
    assert deleted.returncode == 0 and "deleted study" in deleted.stdout, deleted.stderr
    assert keyed.client().status(study.study_name) is None
    assert not keyed.conn.exists(Keys(keyed.prefix).driven_trials_of(study.study_name))
    assert len(study.trials) == 6

    local = Optimizer(lambda trial: trial.suggest_float("x", 0, 1), 1, 3)
    for _ in range(2):
        local.run()
    assert len(local.study.trials) == 6


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"trial_timeout": 1.5}, "trial_timeout 1.5: trial timeouts are whole seconds >= 1"),
        ({"trial_timeout": 0}, "trial_timeout 0: trial timeouts are whole seconds >= 1"),
        ({"trial_timeout": 10**8}, "trial_timeout must be > 0 and at most 2592000 seconds"),
        ({"trial_timeout": "60"}, "trial_timeout must be whole seconds"),
        ({"max_retries": -1}, "max_retries must be an integer from 0 to 100"),
        ({"max_retries": True}, "max_retries must be an integer from 0 to 100"),
        ({"progress": "yes"}, "progress must be True, False or None"),
    ],
)
def test_remote_options_are_checked_naming_them(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        Optimizer("tests.support.objectives:noop", 1, 1, redis_url="redis://localhost:1", **options)


@pytest.mark.parametrize("option", ["trial_timeout", "max_retries", "progress"])
def test_remote_options_are_refused_in_process(option: str) -> None:
    value = {"trial_timeout": 5, "max_retries": 0, "progress": True}[option]
    with pytest.raises(ConfigError, match=f"{option} is for trials run on workers"):
        Optimizer(lambda trial: 0.0, 1, 1, **{option: value})
