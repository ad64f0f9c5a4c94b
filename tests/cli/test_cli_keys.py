"""`optuna-rq keys`: a key set written one file per role, never over an existing one unless
asked, and a set that runs a study end to end: the broker, the workers and the front door each
with its own file, on a real redis-server."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from optuna_rq.cli import key_commands as cli_keys
from optuna_rq.cli.app import main
from optuna_rq.protocol import Record, Role, Signer
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli_env, start_broker, stop_process

ROLES = ("broker", "worker", "client")


def run_keys(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`optuna-rq keys ARGS...` in this process, through the entry point's error handling."""
    with pytest.raises(SystemExit) as exited:
        main(["keys", *args])
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def key_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_writes_one_private_file_per_role_and_says_where_each_goes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "nested" / "keys"
    code, out, err = run_keys(str(directory), capsys=capsys)
    assert code == 0, err
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert sorted(key_files(directory)) == [f"{role}.key" for role in sorted(ROLES)]
    signers = {}
    for role in Role:
        path = directory / f"{role.value}.key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        signers[role] = Signer.load(role, key_file=path)  # each file is its role's key
        assert f"OPTUNA_RQ_KEY_FILE={path} optuna-rq" in out
    assert f"{directory / 'broker.key'} optuna-rq broker" in out
    assert f"{directory / 'worker.key'} optuna-rq workers" in out
    assert "OPTUNA_RQ_SECRET" in out and "can sign as any role" in out
    # One set: what the broker signs, a worker verifies; what a worker signs, the broker does.
    job = signers[Role.BROKER].seal(Record.REQUEST, b"job")
    assert signers[Role.WORKER].open(Record.REQUEST, job) == b"job"
    result = signers[Role.WORKER].seal(Record.RESULT, b"result")
    assert signers[Role.BROKER].open(Record.RESULT, result) == b"result"


def test_an_existing_set_is_replaced_only_with_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_keys(str(tmp_path), capsys=capsys)[0] == 0
    first = key_files(tmp_path)

    code, out, err = run_keys(str(tmp_path), capsys=capsys)
    assert code == 2 and out == ""
    [line] = err.strip().splitlines()
    assert str(tmp_path / "broker.key") in line and "--force" in line, line
    assert key_files(tmp_path) == first

    (tmp_path / "broker.key").unlink()  # one file of a set left is a set there already
    code, _out, err = run_keys(str(tmp_path), capsys=capsys)
    assert code == 2 and str(tmp_path / "worker.key") in err

    code, _out, err = run_keys(str(tmp_path), "--force", capsys=capsys)
    assert code == 0, err
    second = key_files(tmp_path)
    assert sorted(second) == sorted(first)  # the three files, no temporary ones left
    assert all(second[name] != first[name] for name in first)
    assert all(stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600 for name in second)


@pytest.mark.parametrize(
    ("where", "message"),
    [
        (lambda tmp: tmp / "a-file", "exists and is not a directory"),
        (lambda tmp: tmp / "a-file" / "keys", "cannot create"),
    ],
    ids=["a file", "under a file"],
)
def test_a_directory_that_cannot_hold_keys_is_one_line_and_exit_2(
    where, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a-file").write_text("")
    directory = where(tmp_path)
    code, out, err = run_keys(str(directory), capsys=capsys)
    assert code == 2 and out == ""
    [line] = err.strip().splitlines()
    assert line.startswith("Error: ") and message in line and str(directory) in line, line


def test_a_failed_write_leaves_no_partial_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    written = []
    real = cli_keys._write_private

    def full_disk_at_the_third(path: Path, token: str) -> Path:
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        written.append(path)
        return real(path, token)

    monkeypatch.setattr(cli_keys, "_write_private", full_disk_at_the_third)
    code, _out, err = run_keys(str(tmp_path), capsys=capsys)
    assert code == 2 and "No space left on device" in err
    assert list(tmp_path.iterdir()) == []  # neither keys nor temporary files


def test_help_answers(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run_keys("--help", capsys=capsys)
    assert code == 0
    for words in ("DIRECTORY", "--force", "OPTUNA_RQ_KEY_FILE", "OPTUNA_RQ_SECRET", "0600"):
        assert words in out, words


@pytest.mark.timeout(180)
def test_the_installed_command_makes_a_set_that_runs_a_study(
    redis_url: str,
    prefix: str,
    conn: redis.Redis,
    cli_state: Path,
    workers_factory,
    tmp_path: Path,
) -> None:
    installed = Path(sys.executable).with_name("optuna-rq")
    made = subprocess.run(
        [str(installed), "keys", str(tmp_path / "keys")],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    key = {role: str(tmp_path / "keys" / f"{role}.key") for role in ROLES}

    def submit(name: str, *options: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(installed), "--redis-url", redis_url, "--prefix", prefix, *options, "submit"]
            + ["tests.support.objectives:quadratic", "--param", "x={type: float, low: -1, high: 1}"]
            + ["--n-trials", "4", "--concurrency", "2", "--study-name", name, "--wait"],
            env=cli_env(OPTUNA_RQ_STATE_DIR=str(cli_state)),
            capture_output=True,
            text=True,
            timeout=120,
        )

    broker = start_broker(
        redis_url,
        prefix,
        cli_state,
        "--log-level",
        "WARNING",
        env={"OPTUNA_RQ_KEY_FILE": key["broker"]},
    )
    try:
        workers_factory(count=2, env={"OPTUNA_RQ_KEY_FILE": key["worker"]})
        signed = submit("signed", "--key-file", key["client"])
        assert signed.returncode == 0, signed.stderr
        assert conn.hgetall(f"{prefix}:refused") == {}  # every job, result and command verified

        # A worker's file does not make a front door: refused before anything is sent.
        as_worker = submit("as-worker", "--key-file", key["worker"])
        assert as_worker.returncode == 2 and "holds the worker key" in as_worker.stderr

        # A command that only reads verifies with any role's key: `status` on a worker machine.
        read = subprocess.run(
            [str(installed), "--redis-url", redis_url, "--prefix", prefix]
            + ["--key-file", key["worker"], "status", "signed"],
            env=cli_env(OPTUNA_RQ_STATE_DIR=str(cli_state)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert read.returncode == 0 and "finished" in read.stdout, read.stderr

        # Unsigned, a command reaches Redis; the broker refuses it and counts it.
        unsigned = subprocess.run(
            [str(installed), "--redis-url", redis_url, "--prefix", prefix, "submit"]
            + ["tests.support.objectives:quadratic", "--param", "x=0.5", "--n-trials", "1"]
            + ["--concurrency", "1", "--study-name", "unsigned"],
            env=cli_env(OPTUNA_RQ_STATE_DIR=str(cli_state)),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert unsigned.returncode == 0, unsigned.stderr
        wait_until(
            lambda: conn.hget(f"{prefix}:refused", "command") == b"1",
            timeout_s=30,
            message="the broker did not refuse the unsigned submit",
        )
    finally:
        assert stop_process(broker) == 0
