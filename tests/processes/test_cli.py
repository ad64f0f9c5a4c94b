"""The CLI through real processes: a broker daemon, workers, and submit/status/wait/cancel/set."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import redis
from optuna.trial import TrialState

from optuna_rq.storage.storage_access import default_storage_url, open_storage
from optuna_rq.storage.storage_policy import canonical_storage
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, cli_env, live_workers, start_broker, stop_process

pytestmark = pytest.mark.timeout(180)

X = "x={type: float, low: -10, high: 10}"


def status_of(run_cli, name: str) -> dict:
    result = run_cli("status", name, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def samples(conn: redis.Redis, key: str) -> list[int]:
    return [int(v) for v in conn.lrange(f"{key}:samples", 0, -1)]


def test_two_studies_side_by_side_finish_with_exact_counts_and_no_mixing(
    run_cli, broker_process, workers_factory, cli_state: Path
) -> None:
    workers_factory(count=3)
    first = run_cli(
        "submit",
        "tests.support.objectives:quadratic",
        "--param",
        X,
        "--param",
        "depth={type: integer, low: 0, high: 3}",
        "--n-trials",
        "12",
        "--concurrency",
        "2",
        "--study-name",
        "first",
        "--seed",
        "1",
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "first"
    second = run_cli(
        "submit",
        "tests.support.objectives:pair",
        "--param",
        X,
        "--param",
        "y={type: float, low: 0, high: 2}",
        "--direction",
        "minimize",
        "--direction",
        "minimize",
        "--n-trials",
        "8",
        "--concurrency",
        "2",
        "--study-name",
        "second",
    )
    assert second.returncode == 0, second.stderr
    waited = {name: run_cli("wait", name, "--timeout", "90") for name in ("first", "second")}
    assert [w.returncode for w in waited.values()] == [0, 0], [w.stderr for w in waited.values()]

    one, two = status_of(run_cli, "first"), status_of(run_cli, "second")
    # A multi-objective study shows its Pareto front's size and each objective's best over it
    # (both minimized here), in the bar, its last line and `status`; never the front itself.
    front = two["best_values"]
    summary = f"pareto {len(front)}, best {min(p[0] for p in front):.6g} / " + (
        f"{min(p[1] for p in front):.6g}"
    )
    bar, last = waited["second"].stderr.strip().splitlines()[-2:]
    assert summary in bar and "8/8" in bar, waited["second"].stderr
    assert last == f"study 'second' finished: 8 trials, {summary}"
    lines = run_cli("status").stdout.splitlines()
    assert lines[2].split()[:3] == ["second", "finished", "8/8"]
    assert summary in lines[2] and "[" not in "".join(lines)
    assert (one["state"], one["complete"], one["failed"], one["running"]) == ("finished", 12, 0, 0)
    assert (two["state"], two["complete"]) == ("finished", 8)
    assert one["objective"] == "tests.support.objectives:quadratic"
    assert set(one["best_params"]) == {"x", "depth"}
    assert "best_values" in two and "best_value" not in two

    storage = open_storage(default_storage_url(cli_state))
    first_trials = optuna.load_study(study_name="first", storage=storage).trials
    second_trials = optuna.load_study(study_name="second", storage=storage).trials
    assert len(first_trials) == 12 and len(second_trials) == 8
    assert all(set(t.params) == {"x", "depth"} for t in first_trials)
    assert all(set(t.params) == {"x", "y"} and len(t.values) == 2 for t in second_trials)


def test_status_json_has_the_documented_fields(run_cli, broker_process, workers_factory) -> None:
    workers_factory(count=1)
    waited = run_cli(
        "submit",
        "tests.support.objectives:raises",
        "--param",
        X,
        "--n-trials",
        "2",
        "--concurrency",
        "1",
        "--study-name",
        "s",
        "--wait",
    )
    assert waited.returncode == 1  # finished, but without one complete trial: `--wait` says so
    # ... and with what the objective raised, without a look at its trials.
    assert "last error: ValueError: objective refuses x=" in waited.stderr, waited.stderr
    snapshot = status_of(run_cli, "s")
    assert snapshot["last_error"].startswith("ValueError: objective refuses x="), snapshot
    for field in (
        "name",
        "state",
        "objective",
        "n_trials",
        "concurrency",
        "complete",
        "pruned",
        "failed",
        "running",
        "best_value",
        "best_params",
        "fail_reasons",
        "storage",
    ):
        assert field in snapshot, field
    assert snapshot["fail_reasons"] == {"exception": 2}
    everything = json.loads(run_cli("status", "--json").stdout)
    assert [s["name"] for s in everything] == ["s"]
    table = run_cli("status")
    assert table.stdout.splitlines()[1].split()[:5] == ["s", "finished", "2/2", "0", "2"]
    detail = run_cli("status", "s").stdout
    assert "exception: 2" in detail and "last error   ValueError: objective refuses" in detail


def test_the_cap_and_set_concurrency_hold_as_measured_by_the_objective(
    run_cli, broker_process, workers_factory, conn: redis.Redis, prefix: str, redis_url: str
) -> None:
    workers_factory(count=5)
    result = run_cli(
        "submit",
        "tests.support.objectives:capped",
        "--param",
        X,
        "--param",
        f"redis_url={redis_url}",
        "--param",
        f"key={prefix}",
        "--param",
        "hold_s=0.5",  # the study still runs when `set` comes, on a loaded machine
        "--n-trials",
        "40",
        "--concurrency",
        "2",
        "--study-name",
        "capped",
    )
    assert result.returncode == 0, result.stderr
    wait_until(lambda: len(samples(conn, prefix)) >= 8, timeout_s=60)
    before = samples(conn, prefix)
    assert run_cli("set", "capped", "--concurrency", "4").returncode == 0
    assert run_cli("wait", "capped", "--timeout", "90").returncode == 0
    after = samples(conn, prefix)
    assert max(before) == 2, before
    assert max(after) <= 4, after
    assert max(after[len(before) + 4 :]) == 4, f"the raised cap was never used: {after}"
    assert status_of(run_cli, "capped")["concurrency"] == 4


def test_fair_share_follows_priorities(
    run_cli, broker_process, workers_factory, conn: redis.Redis, prefix: str, redis_url: str
) -> None:
    workers_factory(count=4)
    for name, priority in (("low", "1"), ("high", "3")):
        result = run_cli(
            "submit",
            "tests.support.objectives:capped",
            "--param",
            X,
            "--param",
            f"redis_url={redis_url}",
            "--param",
            f"key={prefix}:{name}",
            "--param",
            "hold_s=0.1",
            "--n-trials",
            "400",
            "--concurrency",
            "4",
            "--priority",
            priority,
            "--study-name",
            name,
        )
        assert result.returncode == 0, result.stderr

    def counts() -> tuple[int, int]:
        return len(samples(conn, f"{prefix}:low")), len(samples(conn, f"{prefix}:high"))

    # Measure only while both run: the first study ran alone until the second was submitted.
    wait_until(lambda: min(counts()) >= 4, timeout_s=60)
    low0, high0 = counts()
    wait_until(lambda: sum(counts()) - low0 - high0 >= 80, timeout_s=90)
    low1, high1 = counts()
    for name in ("low", "high"):
        assert run_cli("cancel", name).returncode == 0
    for name in ("low", "high"):
        assert run_cli("wait", name, "--timeout", "60").returncode == 1  # cancelled
    low, high = low1 - low0, high1 - high0
    assert 0.15 < low / high < 0.6, f"slots low:high = {low}:{high}, expected about 1:3"


def test_cancel_ends_running_trials_as_cancelled(
    run_cli,
    broker_process,
    workers_factory,
    conn: redis.Redis,
    prefix: str,
    redis_url: str,
    cli_state: Path,
) -> None:
    workers_factory(count=2)
    run_cli(
        "submit",
        "tests.support.objectives:capped",
        "--param",
        X,
        "--param",
        f"redis_url={redis_url}",
        "--param",
        f"key={prefix}",
        "--param",
        "hold_s=2",  # long enough that the study runs when `cancel` comes, on a loaded machine
        "--n-trials",
        "50",
        "--concurrency",
        "2",
        "--study-name",
        "long",
    )
    wait_until(lambda: status_of(run_cli, "long")["running"] > 0, timeout_s=60)
    assert run_cli("cancel", "long").returncode == 0
    waited = run_cli("wait", "long", "--timeout", "60")
    assert waited.returncode == 1 and "cancelled" in waited.stderr
    snapshot = status_of(run_cli, "long")
    assert snapshot["state"] == "cancelled" and snapshot["fail_reasons"].get("cancelled", 0) >= 1
    study = optuna.load_study(
        study_name="long", storage=open_storage(default_storage_url(cli_state))
    )
    assert not [t for t in study.trials if t.state is TrialState.RUNNING]
    assert len(study.trials) < 50


def test_a_missing_function_fails_its_trials_and_everything_keeps_serving(
    run_cli, broker_process, workers_factory
) -> None:
    # A module only the workers import: here, `submit` would refuse the missing function.
    workers_only = str(Path(__file__).resolve().parents[1] / "support" / "workers_only")
    workers_factory(count=1, modules=("elsewhere",), args=("--path", workers_only))
    run_cli(
        "submit",
        "elsewhere:nope",
        "--param",
        X,
        "--n-trials",
        "20",
        "--concurrency",
        "1",
        "--study-name",
        "missing",
    )
    waited = run_cli("wait", "missing", "--timeout", "60")
    assert waited.returncode == 1 and "import_error" in waited.stderr
    snapshot = status_of(run_cli, "missing")  # stopped after a few, not the whole budget
    assert snapshot["state"] == "failed" and snapshot["fail_reasons"]["import_error"] == 3
    run_cli(
        "submit",
        "elsewhere:takes_x",
        "--param",
        X,
        "--n-trials",
        "2",
        "--concurrency",
        "1",
        "--study-name",
        "after",
    )
    assert run_cli("wait", "after", "--timeout", "60").returncode == 0
    assert status_of(run_cli, "after")["complete"] == 2


def test_resubmitting_continues_the_study(run_cli, broker_process, workers_factory) -> None:
    workers_factory(count=2)
    args = (
        "submit",
        "tests.support.objectives:quadratic",
        "--param",
        X,
        "--concurrency",
        "2",
        "--study-name",
        "again",
    )
    assert run_cli(*args, "--n-trials", "4", "--wait").returncode == 0
    assert run_cli(*args, "--n-trials", "10", "--wait").returncode == 0
    snapshot = status_of(run_cli, "again")
    assert (snapshot["complete"], snapshot["n_trials"]) == (10, 10)


def test_a_second_broker_on_the_prefix_refuses_to_start(run_cli, broker_process) -> None:
    second = run_cli("broker", timeout_s=30)
    assert second.returncode == 1
    assert "already running on prefix" in second.stderr and "since" in second.stderr
    assert "Traceback" not in second.stderr


def test_the_broker_and_optunas_own_lines_follow_log_level(
    run_cli, workers_factory, redis_url: str, prefix: str, cli_state: Path, conn: redis.Redis
) -> None:
    workers_factory(count=1)
    logs = {}
    for level, name in (("warning", "quiet"), ("info", "loud")):
        path = cli_state / f"broker-{level}.log"
        with open(path, "wb") as log:
            broker = start_broker(redis_url, prefix, cli_state, "--log-level", level, stderr=log)
            try:
                done = run_cli(
                    "submit", "tests.support.objectives:quadratic", "--param", X, "--n-trials", "2",
                    "--concurrency", "1", "--study-name", name, "--wait",
                )  # fmt: skip
                assert done.returncode == 0, done.stderr
            finally:
                assert stop_process(broker) == 0
        wait_until(lambda: not conn.exists(f"{prefix}:broker"), timeout_s=30)
        logs[level] = path.read_text()
    assert " INFO " not in logs["warning"], logs["warning"]
    assert "A new study created" not in logs["warning"], logs["warning"]
    # Optuna's INFO line, through the broker's handler and format (not Optuna's own `[I ...]`).
    assert re.search(r" INFO optuna[\w.]*: A new study created .*name: loud", logs["info"]), logs[
        "info"
    ]
    assert "[I " not in logs["info"] and "stopping on SIGTERM" in logs["info"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            (
                "submit",
                "tests.support.objectives.quadratic",
                "--n-trials",
                "1",
                "--concurrency",
                "1",
            ),
            "has no ':'",
        ),
        (
            ("submit", "a:b", "--n-trials", "0", "--concurrency", "1"),
            "Invalid value for '--n-trials'",
        ),
        (
            ("submit", "a:b", "--n-trials", "1", "--concurrency", "0"),
            "Invalid value for '--concurrency'",
        ),
        (
            ("submit", "a:b", "--n-trials", "1", "--concurrency", "1", "--space", "/no/such.yaml"),
            "cannot read space file",
        ),
        (
            (
                "submit",
                "a:b",
                "--n-trials",
                "1",
                "--concurrency",
                "1",
                "--param",
                "x={type: normal}",
            ),
            "unknown suggestion type 'normal'",
        ),
        (
            (
                "submit",
                "a:b",
                "--n-trials",
                "1",
                "--concurrency",
                "1",
                "--param",
                "x={type: float, low: 2, high: 1}",
            ),
            "low must be less than high",
        ),
        (
            ("submit", "a:b", "--n-trials", "1", "--concurrency", "1", "--param", "novalue"),
            "NAME=VALUE",
        ),
        (
            ("submit", "a:b", "--n-trials", "1", "--concurrency", "1", "--sampler", "magic"),
            "'magic' is not one of 'random', 'tpe'",
        ),
        (
            ("submit", "a:b", "--n-trials", "1", "--concurrency", "1", "--direction", "up"),
            "'up' is not one of 'minimize', 'maximize'",
        ),
        *(
            (("submit", "a:b", "--n-trials", "1", "--concurrency", "1", option, value), message)
            for option, value, message in [
                ("--trial-timeout", "3.2e9", "at most 2592000 seconds (30 days), got 3200000000"),
                ("--trial-timeout", "1e300", "at most 2592000 seconds"),
                ("--max-retries", "1000", "--max-retries must be an integer from 0 to 100"),
                ("--priority", "1e300", "--priority must be a number > 0 and at most 1e+06"),
                ("--seed", "-1", "--seed must be an integer from 0 to 4294967295"),
                ("--n-trials", "10000000000", "--n-trials must be an integer from 1 to 1000000000"),
                ("--concurrency", "1000000", "--concurrency must be an integer from 1 to 100000"),
                ("--ask-ahead", "1001", "--ask-ahead must be an integer from 0 to 1000"),
                ("--constant-liar", "--sampler=random", "--constant-liar is a TPE option"),
            ]
        ),
        (("status", "nope"), "unknown study 'nope'"),
        (("wait", "nope"), "unknown study 'nope'"),
        (("cancel", "nope"), "unknown study 'nope'"),
        (("set", "nope", "--concurrency", "2"), "unknown study 'nope'"),
        (("broker", "--storage", "bogus://nowhere"), "rejected by Optuna"),
    ],
)
def test_bad_input_is_a_usage_error_naming_it(run_cli, args: tuple[str, ...], message: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_malformed_space_file_names_the_file(run_cli, tmp_path: Path) -> None:
    bad = tmp_path / "space.yaml"
    bad.write_text("x: {type: float, low: 0\n")
    result = run_cli("submit", "a:b", "--space", str(bad), "--n-trials", "1", "--concurrency", "1")
    assert (
        result.returncode == 2 and str(bad) in result.stderr and "not valid YAML" in result.stderr
    )


def test_an_unreachable_redis_fails_fast_naming_the_url() -> None:
    started = time.monotonic()
    result = subprocess.run(
        cli("--redis-url", "redis://user:secret@127.0.0.1:1/0", "status"),
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "127.0.0.1:1" in result.stderr and "secret" not in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30


def test_a_space_file_submission(run_cli, broker_process, workers_factory, tmp_path: Path) -> None:
    workers_factory(count=2)
    space = tmp_path / "space.yaml"
    space.write_text(
        "model:\n  name: mlp\n  lr: {type: float, low: 1.0e-4, high: 0.1, log: true}\n"
        "  layers: {units: {type: integer, low: 8, high: 64, step: 8}}\nseed: 42\n"
    )
    result = run_cli(
        "submit",
        "tests.support.objectives:nested",
        "--space",
        str(space),
        "--n-trials",
        "4",
        "--concurrency",
        "2",
        "--study-name",
        "nested",
        "--wait",
    )
    assert result.returncode == 0, result.stderr
    snapshot = status_of(run_cli, "nested")
    assert snapshot["complete"] == 4
    assert set(snapshot["best_params"]) == {"model.lr", "model.layers.units"}


def test_a_study_on_postgresql_storage(
    run_cli, workers_factory, redis_url: str, prefix: str, cli_state: Path, empty_database: str
) -> None:
    url = empty_database  # of its own: what other runs left in a shared one is not its
    allowed = canonical_storage(url)  # its URL without the user name and password
    broker = start_broker(redis_url, prefix, cli_state, "--allow-storage", allowed)
    workers_factory(count=2)
    name = f"pg-{prefix}"
    result = run_cli(
        "submit",
        "tests.support.objectives:quadratic",
        "--param",
        X,
        "--n-trials",
        "6",
        "--concurrency",
        "2",
        "--study-name",
        name,
        "--storage",
        url,
        "--wait",
    )
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name=name, storage=url)
    try:
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6
        assert status_of(run_cli, name)["storage"] == url
    finally:
        assert stop_process(broker) == 0


def test_the_demo_runs_end_to_end_and_leaves_nothing_running() -> None:
    env = cli_env()
    env.pop("COLUMNS", None)  # a pipe, and no width to wrap to
    result = subprocess.run(
        cli("demo", "--n-trials", "20"), env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "best value" in result.stderr and "model.lr" in result.stderr
    # Output that is not a terminal is not wrapped: the command to copy is one line.
    suggested = [line for line in result.stderr.splitlines() if " submit mypkg" in line]
    assert len(suggested) == 1 and suggested[0].endswith(" --wait"), result.stderr
    assert len(suggested[0]) > 80
    leftovers = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"optuna-rq-demo" in cmdline or b"orq-demo-" in cmdline:
            leftovers.append(cmdline.decode(errors="replace"))
    assert leftovers == []


def test_a_storage_url_optuna_rejects_is_refused_at_submit_and_the_broker_serves_on(
    run_cli, broker_process, workers_factory
) -> None:
    workers_factory(count=1)
    bad = run_cli(
        "submit",
        "tests.support.objectives:quadratic",
        "--param",
        X,
        "--n-trials",
        "1",
        "--concurrency",
        "1",
        "--study-name",
        "bad",
        "--storage",
        "bogus://nowhere",
    )
    # Checked at submit, before anything is sent (a URL that reaches the broker on the wire
    # fails its study alone: tests/processes/faults/test_bad_storages.py)
    assert bad.returncode == 2 and "'bogus://nowhere' is not a storage URL" in bad.stderr
    assert run_cli("status", "bad").returncode == 2
    good = run_cli(
        "submit",
        "tests.support.objectives:quadratic",
        "--param",
        X,
        "--n-trials",
        "2",
        "--concurrency",
        "1",
        "--study-name",
        "good",
        "--wait",
    )
    assert good.returncode == 0, good.stderr


def test_a_define_by_run_objective_with_a_pruner_from_the_daemon(
    run_cli, broker_process, workers_factory
) -> None:
    workers_factory(count=2)
    result = run_cli(
        "submit",
        "tests.support.objectives:define_by_run",
        "--pruner",
        "median",
        "--sampler",
        "random",
        "--seed",
        "0",
        "--n-trials",
        "20",
        "--concurrency",
        "2",
        "--study-name",
        "dbr",
        "--wait",
    )
    assert result.returncode == 0, result.stderr
    snapshot = status_of(run_cli, "dbr")
    assert snapshot["complete"] + snapshot["pruned"] == 20 and snapshot["pruned"] > 0
    assert set(snapshot["best_params"]) == {"x"}


def test_global_options_after_the_command_as_rq_worker_u_is_typed(
    redis_url: str, prefix: str, conn: redis.Redis, broker_process, cli_state: Path
) -> None:
    where = ("--redis-url", redis_url, "--prefix", prefix)
    pool = subprocess.Popen(
        cli("workers", "--import", "tests.support.objectives", *where), env=cli_env()
    )
    try:
        wait_until(lambda: live_workers(conn, prefix) == 1, timeout_s=60, message="it serves")
        env = cli_env(OPTUNA_RQ_STATE_DIR=str(cli_state))
        submit = ("submit", "tests.support.objectives:quadratic", "--param", X, "--n-trials", "2")
        done = subprocess.run(
            cli(*submit, "--concurrency", "1", "--study-name", "after", "--wait", *where),
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        shown = subprocess.run(
            cli("status", "after", "--json", *where),
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["complete"] == 2
    finally:
        assert stop_process(pool) == 0


class Tmux:
    """A terminal: one tmux pane of `width` columns on a private tmux server, running one
    command under bash, which prints `exited CODE` once it exits (tmux itself does not always
    reap the pane's process here, so its own record of the exit is not relied on); the pane is
    kept afterwards, to read the screen."""

    def __init__(self, socket: Path, command: list[str], *, width: int) -> None:
        self.socket = socket
        script = f'{shlex.join(command)}; echo "exited $?"'
        self.run("new-session", "-d", "-x", str(width), "-y", "40", "-s", "t", "bash", "-c", script)
        self.run("set-option", "-t", "t", "remain-on-exit", "on")

    def run(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-S", str(self.socket), "-f", "/dev/null", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-J", "-S", "-", "-t", "t")

    def exit_status(self) -> int | None:
        """The command's exit status once it exited, else None."""
        found = re.search(r"^exited (\d+)$", self.screen(), re.MULTILINE)
        return None if found is None else int(found.group(1))

    def close(self) -> None:
        subprocess.run(
            ["tmux", "-S", str(self.socket), "kill-server"], capture_output=True, timeout=30
        )


def interrupted(terminal: Tmux) -> str:
    """Ctrl-C once the bar shows, in full width ("waiting for a worker: ..."); the screen after
    the command exited, which must be with 130."""

    def shows_the_full_bar() -> bool:
        assert terminal.exit_status() is None, terminal.screen()
        screen = terminal.screen()
        return "0/3" in screen and "waiting" in screen

    try:
        wait_until(shows_the_full_bar, timeout_s=60)
    except AssertionError as exc:
        raise AssertionError(terminal.screen()) from exc
    terminal.run("send-keys", "-t", "t", "C-c")
    wait_until(lambda: terminal.exit_status() is not None, timeout_s=30, message="it exits")
    screen = terminal.screen()
    assert terminal.exit_status() == 130, screen
    return screen


@pytest.mark.parametrize("follower", ["submit --wait", "wait"])
def test_ctrl_c_on_a_follower_shows_the_bar_once_and_says_the_study_runs_on(
    follower: str,
    run_cli,
    broker_process,
    redis_url: str,
    prefix: str,
    cli_state: Path,
    tmp_path: Path,
) -> None:
    if shutil.which("tmux") is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is required in CI (a real terminal for Ctrl-C)")
        pytest.skip("tmux not installed")
    pythonpath = cli_env()["PYTHONPATH"]
    # As a user's terminal: its own width (the session's COLUMNS is not the pane's).
    env = ["env", "-u", "COLUMNS", "-u", "LINES", f"PYTHONPATH={pythonpath}"]
    env.append(f"OPTUNA_RQ_STATE_DIR={cli_state}")
    for name in ("s1", "s2"):  # twice: Ctrl-C lands wherever the follower happens to be
        # No worker serves the study: it waits for one, a long bar line ("waiting for a
        # worker: optuna-rq workers --import tests.support.objectives") that fills the width.
        submit = ["submit", "tests.support.objectives:quadratic", "--param", X, "--n-trials", "3"]
        submit += ["--concurrency", "1", "--study-name", name]
        if follower == "wait":
            assert run_cli(*submit).returncode == 0
            args = ["wait", name]
        else:
            args = [*submit, "--wait"]
        command = [*env, *cli("--redis-url", redis_url, "--prefix", prefix, *args)]
        terminal = Tmux(tmp_path / f"{name}.sock", command, width=100)
        try:
            screen = interrupted(terminal)
        finally:
            terminal.close()
        bars = [line for line in screen.splitlines() if "0/3" in line]
        assert len(bars) == 1, screen
        said = f"stopped following study {name!r}; it runs on: `optuna-rq --prefix {prefix} wait "
        assert f"{said}{name}` follows it again" in screen, screen
        shown = run_cli("status", name, "--json")  # and it does run on
        assert shown.returncode == 0 and json.loads(shown.stdout)["state"] == "running"
