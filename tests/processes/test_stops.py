"""Studies that stop before their budget, and what a later command does to an ended study, through
the real CLI, broker and worker processes (the Optimizer's `study.stop()` in-process).

A stop condition (`--timeout`, `--target`, `--patience`) ends a study `finished`: a success, said
in `stopped` (never in `error`), and `wait` exits 0 saying why. An ended study, or one a stop
condition is winding down, refuses `set` (and an ended one `cancel`), by one rule the CLI and
the broker both apply (`protocol.status.refuse_if_closed`); resubmitting reopens it.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
import redis
from optuna.trial import TrialState

from optuna_rq import Optimizer
from optuna_rq.client import BrokerClient, queued_status
from optuna_rq.daemon.broker_settings import BrokerSettings
from optuna_rq.daemon.command_handlers import Commands
from optuna_rq.daemon.daemon import Daemon
from optuna_rq.errors import StudyEndedError
from optuna_rq.plumbing.connection import connect
from optuna_rq.protocol import Change, Keys, Signer, StudySpec, StudyState, refuse_if_closed
from optuna_rq.storage.storage_access import default_storage_url, open_storage
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, cli_env, start_broker, stop_process

pytestmark = pytest.mark.timeout(180)

HELD = ("tests.support.held_objectives",)
RED = re.compile(r"\x1b\[(?:\d+;)*31m")
"""rich's `[red]`, as a terminal gets it."""

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_coloured(redis_url: str, prefix: str, cli_state: Path) -> Run:
    """`optuna-rq ARGS...` on the test's prefix, writing colour as to a terminal: what a
    user sees in red shows as its escape code."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cli("--redis-url", redis_url, "--prefix", prefix, *args),
            env=cli_env(OPTUNA_RQ_STATE_DIR=str(cli_state), FORCE_COLOR="1", COLUMNS="200"),
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


@pytest.fixture
def logged_broker(redis_url: str, prefix: str, cli_state: Path, tmp_path: Path) -> Iterator[Path]:
    """`optuna-rq broker` on the test's prefix, its log in the file yielded."""
    log = tmp_path / "broker.log"
    with open(log, "wb") as out:
        process = start_broker(redis_url, prefix, cli_state, stderr=out)
    yield log
    assert stop_process(process) == 0


@pytest.fixture
def gate(workers_factory, redis_url: str, prefix: str) -> Iterator[redis.Redis]:
    """Workers serving `tests.support.held_objectives`, and the connection that lets their calls go
    (`KEY:go`, KEY being the prefix); whatever is still held goes at the end, so the workers
    stop at once even after a test failed."""
    workers_factory(count=2, modules=HELD)
    conn = connect(redis_url)
    yield conn
    conn.rpush(f"{prefix}:go", *["go"] * 100)
    conn.close()


def status_of(run_cli: Run, name: str) -> dict:
    out = run_cli("status", name, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def held(name: str, redis_url: str, key: str, *extra: str) -> tuple[str, ...]:
    return (
        "submit",
        "tests.support.held_objectives:held",
        "--param",
        "x={type: float, low: 0, high: 1}",
        "--param",
        f"redis_url={redis_url}",
        "--param",
        f"key={key}",
        "--sampler",
        "random",
        "--study-name",
        name,
        *extra,
    )


def last_line(stderr: str) -> str:
    """The last line printed, without the terminal's show-cursor code a live bar ends with."""
    return re.sub(r"\x1b\[\?25[hl]", "", stderr.strip().splitlines()[-1])


# -- each stop condition is a success ----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (("--timeout", "1"), "stopped by --timeout 1: "),
        (("--target", "1e9"), "stopped by --target 1e+09: trial "),
        (("--patience", "2"), "stopped by --patience 2: no improvement in "),
    ],
    ids=["timeout", "target", "patience"],
)
def test_a_stop_condition_ends_the_study_a_success_and_a_later_set_is_refused(
    run_cli: Run,
    run_coloured: Run,
    broker_process,
    workers_factory,
    options: tuple[str, ...],
    named: str,
) -> None:
    workers_factory(count=2)
    # x fixed: every trial has the same value, so trial 0 stays the best (--patience holds),
    # 0 reaches --target at once, and 5000 trials outlast --timeout 1.
    submit = (
        "submit",
        "tests.support.objectives:quadratic",
        "--param",
        "x=2.0",
        "--study-name",
        "s",
    )
    waited = run_coloured(*submit, "--n-trials", "5000", "--concurrency", "2", *options, "--wait")
    assert waited.returncode == 0, waited.stderr
    said = last_line(waited.stderr)
    assert re.fullmatch(rf"study 's' finished: \d+ trials, best 0 \({re.escape(named)}.*\)", said)
    assert not RED.search(said), said  # not said as an error

    followed = run_coloured("wait", "s")
    assert followed.returncode == 0, followed.stderr
    assert last_line(followed.stderr) == said
    snapshot = status_of(run_cli, "s")
    assert snapshot["state"] == "finished" and snapshot["stopped"].startswith(named), snapshot
    assert snapshot["error"] is None  # a success: nothing in `error`
    assert snapshot["running"] == 0 and 0 < snapshot["ended"] < 5000
    assert f"stopped      {snapshot['stopped']}" in run_cli("status", "s").stdout

    # An ended study takes no `set` and no `cancel`: exit 2, naming it and the way to reopen it.
    for command in (("set", "s", "--n-trials", "6000"), ("set", "s", "--concurrency", "3")):
        refused = run_cli(*command)
        assert refused.returncode == 2, (command, refused.stderr)
        assert last_line(refused.stderr) == (
            f"Error: study 's' is finished ({snapshot['stopped']}): `set` does not change a "
            "study that ended; resubmitting it (the same definition, --study-name s) reopens it"
        )
    cancelled = run_cli("cancel", "s")
    assert cancelled.returncode == 2 and "`cancel` does not change" in cancelled.stderr
    after = status_of(run_cli, "s")
    assert {k: v for k, v in after.items() if k != "updated_at"} == {
        k: v for k, v in snapshot.items() if k != "updated_at"
    }

    # Resubmitting reopens it, as any finished study: its clock counts from the new submission.
    again = run_cli(*submit, "--n-trials", "5000", "--concurrency", "2", *options, "--wait")
    assert again.returncode == 0, again.stderr
    reopened = status_of(run_cli, "s")
    assert reopened["state"] == "finished" and reopened["stopped"].startswith(named)
    assert reopened["submitted_at"] > snapshot["submitted_at"]
    if options[0] == "--timeout":  # the others held already: the reopened study stops at once
        assert reopened["ended"] > snapshot["ended"]


def test_a_study_the_timeout_winds_down_refuses_set_and_starts_no_trial(
    run_cli: Run, logged_broker: Path, gate: redis.Redis, redis_url: str, prefix: str
) -> None:
    conn = gate
    submitted = run_cli(
        *held("wind", redis_url, prefix, "--n-trials", "50", "--concurrency", "1"),
        "--timeout",
        "1",
    )
    assert submitted.returncode == 0, submitted.stderr
    # Its one trial runs on, held, past the timeout: the study is stopping, still running.
    wait_until(lambda: status_of(run_cli, "wind").get("stopped"), timeout_s=60)
    stopping = status_of(run_cli, "wind")
    assert stopping["state"] == "running" and stopping["running"] == 1, stopping
    assert stopping["stopped"].startswith("stopped by --timeout 1: ")

    for command in (("set", "wind", "--n-trials", "60"), ("set", "wind", "--concurrency", "3")):
        refused = run_cli(*command)
        assert refused.returncode == 2, (command, refused.stderr)
        assert last_line(refused.stderr) == (
            f"Error: study 'wind' is stopping ({stopping['stopped']}): `set` does not change a "
            "study that stopped; resubmitting it (the same definition, --study-name wind) "
            "reopens it"
        )
    # The broker applies the same rule to a change sent anyway (as one sent a moment before
    # the timeout held would come): refused, in the same words.
    BrokerClient(conn, prefix).send(Change(study="wind", n_trials=60, concurrency=3))
    refusal = f"refused a command: study 'wind' is stopping ({stopping['stopped']}): `set` does"
    wait_until(lambda: refusal in logged_broker.read_text(), timeout_s=30)

    conn.rpush(f"{prefix}:go", "go")
    wait_until(lambda: status_of(run_cli, "wind")["state"] == "finished", timeout_s=60)
    ended = status_of(run_cli, "wind")
    assert (ended["ended"], ended["complete"], ended["concurrency"]) == (1, 1, 1), ended
    assert ended["stopped"] == stopping["stopped"] and ended["error"] is None
    assert conn.llen(f"{prefix}:started") == 1  # no trial started after the timeout held
    waited = run_cli("wait", "wind")
    assert waited.returncode == 0 and "(stopped by --timeout 1: " in last_line(waited.stderr)


def test_a_callbacks_study_stop_ends_an_in_process_run_cleanly() -> None:
    """The Python API's stop condition: the run returns, the trials running when it was
    called finish COMPLETE, and none starts after it."""
    calls: list[int] = []

    async def objective(trial: optuna.Trial) -> float:
        calls.append(trial.number)
        return trial.suggest_float("x", 0, 1)

    def stop_at_three(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if len(study.get_trials(states=(TrialState.COMPLETE,))) == 3:
            study.stop()

    for _ in range(3):  # each run is a new loop over the same flag
        opt = Optimizer(objective, concurrency=2, n_trials=40, callbacks=[stop_at_three])
        assert opt.run() is opt.study
        states = [t.state for t in opt.study.trials]
        assert states == [TrialState.COMPLETE] * len(states) and 3 <= len(states) <= 4, states
        assert sorted(calls) == [t.number for t in opt.study.trials]
        calls.clear()


# -- one rule for every ended study, on both sides ------------------------------------------------

ENDED = [
    (StudyState.FINISHED, None),  # by its budget
    (StudyState.FINISHED, "stopped by --patience 2: no improvement in 2 completed trials"),
    (StudyState.CANCELLED, None),
    (StudyState.FAILED, None),
]


@pytest.fixture
def daemon(conn: redis.Redis, prefix: str) -> Iterator[Daemon]:
    """An in-process broker on the test's prefix (memory storage, no loop turning)."""
    made = Daemon(conn, BrokerSettings(prefix=prefix, storage="memory"))
    made.acquire()
    yield made
    made.dispatcher.stop_sampling()
    made.release()


@pytest.mark.parametrize(
    ("state", "stopped"), ENDED, ids=["budget", "stopped", "cancelled", "failed"]
)
def test_every_ended_study_refuses_cancel_and_set_by_one_rule_on_both_sides(
    daemon: Daemon, conn: redis.Redis, prefix: str, state: StudyState, stopped: str | None
) -> None:
    """The CLI's client refuses before sending, the broker's handlers refuse what was sent
    before the study ended: the same error, in the same words, exit 2."""
    spec = StudySpec(
        name="over", objective="tests.support.objectives:noop", space={}, n_trials=3, concurrency=1
    )
    daemon.registry.store(spec)  # the broker holds its spec, and published it ended
    ended = queued_status(spec).with_changes(state=state, stopped=stopped, complete=3)
    conn.hset(Keys(prefix).status, "over", ended.sealed(Signer()))
    client, handlers = BrokerClient(conn, prefix), Commands(daemon.registry)
    sides: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "cancel": (lambda: client.cancel("over"), lambda: handlers.on_cancel("over")),
        "set": (
            lambda: client.change("over", n_trials=9, concurrency=2),
            lambda: handlers.on_change("over", {"n_trials": 9, "concurrency": 2}),
        ),
    }
    for command, (by_client, by_broker) in sides.items():
        with pytest.raises(StudyEndedError) as at_client:
            by_client()
        with pytest.raises(StudyEndedError) as at_broker:
            by_broker()
        assert str(at_client.value) == str(at_broker.value)
        assert at_client.value.exit_code == 2
        why = f" ({stopped})" if stopped else ""
        assert str(at_client.value) == (
            f"study 'over' is {state.value}{why}: `{command}` does not change a study that "
            "ended; resubmitting it (the same definition, --study-name over) reopens it"
        )
    assert conn.llen(Keys(prefix).commands) == 0  # nothing was sent
    assert daemon.registry.stored_spec("over") == spec  # nor changed
    assert client.status("over") == ended


@pytest.mark.parametrize("state", list(StudyState))
@pytest.mark.parametrize("stopped", [None, "stopped by --timeout 5: 5s since it was submitted"])
def test_the_rule_refuses_exactly_ended_studies_and_set_of_stopping_ones(
    state: StudyState, stopped: str | None
) -> None:
    for command in ("cancel", "set"):
        refused = state.ended or (command == "set" and stopped is not None)
        try:
            refuse_if_closed("s", state, stopped=stopped, command=command)
        except StudyEndedError as exc:
            assert refused, (state, stopped, command, exc)
        else:
            assert not refused, (state, stopped, command)


# -- set --n-trials below what the study started -------------------------------------------------


def test_set_n_trials_below_the_trials_started_winds_the_study_down(
    run_cli: Run, broker_process, gate: redis.Redis, redis_url: str, prefix: str
) -> None:
    conn = gate
    conn.rpush(f"{prefix}:go", *["go"] * 3)  # three trials return, the fourth is held
    submitted = run_cli(*held("less", redis_url, prefix, "--n-trials", "10", "--concurrency", "1"))
    assert submitted.returncode == 0, submitted.stderr

    def three_done_one_running() -> bool:
        s = status_of(run_cli, "less")
        return (s["ended"], s["running"]) == (3, 1)

    wait_until(three_done_one_running, timeout_s=60)
    changed = run_cli("set", "less", "--n-trials", "1")
    assert changed.returncode == 0, changed.stderr
    assert last_line(changed.stderr) == (
        "study 'less' has started 4 trials, more than --n-trials 1: it starts no more, and "
        "finishes once they end (its budget becomes what it started)"
    )
    wait_until(lambda: status_of(run_cli, "less")["n_trials"] == 4, timeout_s=30)
    assert status_of(run_cli, "less")["state"] == "running"  # its fourth trial runs on
    conn.rpush(f"{prefix}:go", "go")
    waited = run_cli("wait", "less", "--timeout", "60")
    assert waited.returncode == 0, waited.stderr
    assert "study 'less' finished: 4 trials" in waited.stderr
    ended = status_of(run_cli, "less")
    assert (ended["ended"], ended["n_trials"], ended["complete"]) == (4, 4, 4), ended
    assert "4/4 done" in run_cli("status", "less").stdout
    assert conn.llen(f"{prefix}:started") == 4


# -- delete without --purge, then another definition under the name ------------------------------


def test_a_deleted_studys_name_resubmitted_with_another_objective_is_refused_not_mixed(
    run_cli: Run, broker_process, workers_factory, cli_state: Path
) -> None:
    workers_factory(count=1)
    x = ("--param", "x={type: float, low: -10, high: 10}", "--concurrency", "1")

    def submit(objective: str, name: str, n_trials: int) -> subprocess.CompletedProcess[str]:
        return run_cli(
            "submit", f"tests.support.objectives:{objective}", *x, "--study-name", name,
            "--n-trials", str(n_trials), "--wait",
        )  # fmt: skip

    def trials(name: str) -> list[optuna.trial.FrozenTrial]:
        storage = open_storage(default_storage_url(cli_state))
        return optuna.load_study(study_name=name, storage=storage).trials

    assert submit("quadratic", "reused", 3).returncode == 0
    assert run_cli("delete", "reused").returncode == 0  # its 3 trials stay in the storage
    refused = submit("noop", "reused", 2)
    assert refused.returncode == 1, refused.stderr
    assert last_line(refused.stderr) == (
        "study 'reused' failed: its storage holds the trials of an earlier study 'reused' of "
        "another definition (objective 'tests.support.objectives:quadratic', not "
        "'tests.support.objectives:noop'), which the broker no longer holds (deleted without "
        "--purge, or another prefix's); nothing was added to it. Submit it under another "
        "--study-name, or drop those trials first with `optuna-rq delete reused --purge`"
    )
    kept = trials("reused")
    assert len(kept) == 3 and all(t.value == (t.params["x"] - 2) ** 2 for t in kept)
    # The way out it names works: purged, the name starts afresh with the new objective.
    assert run_cli("delete", "reused", "--purge").returncode == 0
    assert submit("noop", "reused", 2).returncode == 0
    assert [t.value for t in trials("reused")] == [t.params["x"] for t in trials("reused")]
    assert len(trials("reused")) == 2

    # The same definition after a delete continues its trials, as documented.
    assert submit("quadratic", "kept", 2).returncode == 0
    assert run_cli("delete", "kept").returncode == 0
    assert submit("quadratic", "kept", 4).returncode == 0
    assert len(trials("kept")) == 4 and status_of(run_cli, "kept")["ended"] == 4
