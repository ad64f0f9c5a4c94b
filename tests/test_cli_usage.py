"""Every subcommand, given bad input, says so on one line and exits 2: through the real entry
point (`python -m optuna_rq.cli`), with no Redis, so nothing is started and nothing is sent.
And the embedded redis-server: read-only commands never start it, `redis stop` ends it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from optuna_rq.embedded import EmbeddedRedis
from optuna_rq.processes import exited
from tests.conftest import redis_server
from tests.worker_processes import cli, cli_env

pytestmark = pytest.mark.timeout(60)

SUBMIT = ("submit", "a:b", "--n-trials", "1", "--concurrency", "1")

# (argv, a fragment of the one line it prints)
CASES = [
    # missing required options or arguments
    (("workers",), "Missing option '--import'"),
    (("submit", "a:b", "--concurrency", "1"), "Missing option '--n-trials'"),
    (("submit",), "Missing argument 'objective'"),
    (("wait",), "Missing argument 'name'"),
    (("cancel",), "Missing argument 'name'"),
    (("set",), "Missing argument 'name'"),
    (("trials",), "Missing argument 'name'"),
    (("best",), "Missing argument 'name'"),
    (("delete",), "Missing argument 'name'"),
    (("enqueue", "s"), "Missing argument 'file'"),
    # unknown options
    *(
        ((*cmd, "--bogus"), "No such option: --bogus")
        for cmd in (
            ("workers", "-i", "m"),
            ("broker",),
            SUBMIT,
            ("status",),
            ("wait", "s"),
            ("cancel", "s"),
            ("set", "s"),
            ("demo",),
            ("trials", "s"),
            ("best", "s"),
            ("delete", "s"),
            ("enqueue", "s", "f.yaml"),
            ("keys", "k"),
            ("redis", "stop"),
        )
    ),
    # values of the wrong type
    (("workers", "-i", "m", "--count", "two"), "Invalid value for '--count'"),
    (("broker", "--metrics-port", "http"), "Invalid value for '--metrics-port'"),
    (
        ("submit", "a:b", "--n-trials", "abc", "--concurrency", "1"),
        "Invalid value for '--n-trials'",
    ),
    (("wait", "s", "--timeout", "soon"), "Invalid value for '--timeout'"),
    (("set", "s", "--concurrency", "many"), "Invalid value for '--concurrency'"),
    (("demo", "--n-trials", "x"), "Invalid value for '--n-trials'"),
    (("delete", "s", "--timeout", "never"), "Invalid value for '--timeout'"),
    (("--max-message-bytes", "big", "status"), "Invalid value for '--max-message-bytes'"),
    # out-of-range values
    (("workers", "-i", "m", "--count", "0"), "greater than or equal to 1"),
    (("workers", "-i", "m", "--lease-ttl", "0.1"), "greater than or equal to 0.5"),
    (("broker", "--metrics-port", "70000"), "less than or equal to 65535"),
    (("submit", "a:b", "--n-trials", "0", "--concurrency", "1"), "greater than or equal to 1"),
    ((*SUBMIT, "--max-retries", "-1"), "greater than or equal to 0"),
    ((*SUBMIT, "--priority", "0"), "greater than or equal to 0.001"),
    ((*SUBMIT, "--trial-timeout", "1.5"), "whole seconds"),
    ((*SUBMIT, "--trial-timeout", "0.5"), "whole seconds"),
    (("status", "--state", "sleeping"), "--state sleeping"),
    (("wait", "s", "--timeout", "-1"), "greater than or equal to 0"),
    (("set", "s", "--n-trials", "0"), "greater than or equal to 1"),
    (("demo", "--workers", "0"), "greater than or equal to 1"),
    (("trials", "s", "--format", "xml"), "--format 'xml'"),
    (("--max-message-bytes", "10", "status"), "greater than or equal to 1024"),
    # other input checked before anything is sent
    ((*SUBMIT, "--param", "x={type:float,low:-1,high:1}"), "'type: float'"),
    ((*SUBMIT, "--storage", "foo://bar"), "'foo://bar' is not a storage URL"),
    ((*SUBMIT, "--storage", "sqlite:////dev/null/x.db"), "sqlite:////dev/null/x.db"),
    ((*SUBMIT, "--enqueue", "/no/such/sets.yaml"), "cannot read parameter-set file"),
    (("nope",), "No such command 'nope'"),
]


def run(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    # An unreachable Redis: a usage error must be found before any connection is tried.
    env = cli_env(OPTUNA_RQ_STATE_DIR=str(state), OPTUNA_RQ_REDIS_URL="redis://127.0.0.1:1/0")
    return subprocess.run(cli(*args), env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "message"), CASES, ids=lambda v: " ".join(v) if isinstance(v, tuple) else None
)
def test_bad_input_is_one_line_and_exit_2(
    args: tuple[str, ...], message: str, tmp_path: Path
) -> None:
    result = run(*args, state=tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_debug_adds_the_traceback(tmp_path: Path) -> None:
    result = run("--debug", *SUBMIT, "--trial-timeout", "1.5", state=tmp_path)
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_bare_command_shows_the_help_and_exits_2(tmp_path: Path) -> None:
    result = run(state=tmp_path)
    assert result.returncode == 2
    assert "Usage: optuna-rq" in result.stderr and "submit" in result.stderr
    assert "Traceback" not in result.stderr


def test_version(tmp_path: Path) -> None:
    result = run("--version", state=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("optuna-rq ")


def test_help_lists_every_environment_variable_and_flags_as_flags(tmp_path: Path) -> None:
    top = run("--help", state=tmp_path).stdout
    for var in (
        "OPTUNA_RQ_REDIS_URL",
        "OPTUNA_RQ_PREFIX",
        "OPTUNA_RQ_STATE_DIR",
        "OPTUNA_RQ_SECRET",
        "OPTUNA_RQ_MAX_MESSAGE_BYTES",
        "OPTUNA_RQ_REDIS_PASSWORD",
        "OPTUNA_RQ_REDIS_PASSWORD_FILE",
    ):
        assert var in top, var
    assert "--install-completion" in top
    assert "OPTUNA_RQ_LEASE_TTL" in run("workers", "--help", state=tmp_path).stdout
    submit = run("submit", "--help", state=tmp_path).stdout
    assert "<bool>" not in submit and "--wait " in submit


def test_read_only_commands_never_start_a_redis_server(tmp_path: Path) -> None:
    env = cli_env(OPTUNA_RQ_STATE_DIR=str(tmp_path))
    env.pop("OPTUNA_RQ_REDIS_URL", None)
    for args in (("status",), ("wait", "s"), ("trials", "s"), ("best", "s")):
        result = subprocess.run(cli(*args), env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, (args, result.stderr)
        assert "no embedded redis-server running" in result.stderr, result.stderr
        assert not (tmp_path / "redis.sock").exists() and not (tmp_path / "redis.pid").exists()


def test_redis_stop_ends_the_embedded_server_a_command_started(embedded_state: Path) -> None:
    if redis_server() is None:
        pytest.skip("no redis-server binary for an embedded server")
    env = cli_env(OPTUNA_RQ_STATE_DIR=str(embedded_state))
    env.pop("OPTUNA_RQ_REDIS_URL", None)

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cli(*args), env=env, capture_output=True, text=True, timeout=60)

    # submit writes, so it starts the embedded server (no broker yet: the study waits for one)
    submitted = command(*SUBMIT, "--study-name", "s")
    assert submitted.returncode == 0, submitted.stderr
    pid = EmbeddedRedis(embedded_state).pid()
    assert pid is not None and not exited(pid)

    stopped = command("redis", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stderr.strip() == f"stopped the embedded redis-server under {embedded_state}"
    assert exited(pid)
    assert not (embedded_state / "redis.sock").exists()

    again = command("redis", "stop")  # nothing to stop is not an error
    assert again.returncode == 0, again.stderr
    assert "no embedded redis-server was running" in again.stderr
