"""A redis-server whose users are deploy/redis/redis-acl.conf's, as deploy/redis/redis-acl.sh
writes them: the one place the ACL rules live, read by the tests as by the deployments."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from optuna_rq.plumbing.connection import connect
from tests.support.helpers import wait_until

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
RULES = DEPLOY / "redis" / "redis-acl.conf"
SCRIPT = DEPLOY / "redis" / "redis-acl.sh"
PREFIX = "optuna-rq"
"""The prefix the rules are written for (deploy/redis/redis-acl.conf)."""
ROLES = ("broker", "worker", "client", "optimizer")
ADMIN = "admin"
"""A user of the tests' own (every key and command), for ACL LOG and for setting the scene."""


def password_of(user: str) -> str:
    return f'{user}-pw with space, quote " and #'  # the script must take any character


def write_acl_file(out: Path, *, users: tuple[str, ...] = ROLES) -> str:
    """Write the ACL file of `users` with deploy/redis/redis-acl.sh (the others are off), and an
    admin user; return what the script said on stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_PASSWORD_")}
    env.update({f"REDIS_PASSWORD_{user.upper()}": password_of(user) for user in users})
    done = subprocess.run(
        ["sh", str(SCRIPT), str(RULES), str(out)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    with open(out, "a") as acl:
        acl.write(f"user {ADMIN} on >{ADMIN}-pw ~* &* +@all\n")
    return done.stderr


@dataclass(frozen=True)
class AclServer:
    socket: Path
    directory: Path
    process: subprocess.Popen[bytes]

    def url(self, user: str) -> str:
        """The URL of `user`, without its password (it goes apart: `password_of`)."""
        return f"unix://{user}@{self.socket}"

    def connect(self, user: str) -> redis.Redis:
        password = f"{ADMIN}-pw" if user == ADMIN else password_of(user)
        return connect(self.url(user), password=password, retries=0)

    def env(self, user: str, **extra: str) -> dict[str, str]:
        """What a CLI process of `user` gets: its password apart from the URL."""
        return {"OPTUNA_RQ_REDIS_PASSWORD": password_of(user), **extra}

    def denials(self) -> list[dict[str, object]]:
        """ACL LOG: every command Redis refused a user since it started (or the last reset)."""
        entries: list[dict[str, object]] = self.connect(ADMIN).acl_log()  # type: ignore[assignment]
        return [e for e in entries if e.get("username") != "default"]


@contextmanager
def acl_server(executable: str) -> Iterator[AclServer]:
    """`executable` (a redis-server or valkey-server) on a unix socket, with the deploy ACL."""
    directory = Path(tempfile.mkdtemp(prefix="orqacl", dir="/tmp"))
    write_acl_file(directory / "users.acl")
    sock = directory / "redis.sock"
    with open(directory / "redis.log", "wb") as log:
        process = subprocess.Popen(
            [executable, "--port", "0", "--unixsocket", str(sock), "--save", ""]
            + ["--appendonly", "no", "--dir", str(directory)]
            + ["--aclfile", str(directory / "users.acl")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = AclServer(sock, directory, process)

    def answers() -> bool:
        assert process.poll() is None, (directory / "redis.log").read_text()
        try:
            return bool(sock.exists() and server.connect(ADMIN).ping())
        except redis.RedisError:
            return False

    try:
        wait_until(answers, timeout_s=15, message=f"{executable} did not start")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(directory, ignore_errors=True)


def acl_servers() -> list[tuple[str, str]]:
    """(id, executable) of every server here whose ACLs have key permissions (Redis 7+, Valkey):
    the embedded valkey-server, and a redis-server on PATH if it is 7 or later."""
    from optuna_rq.plumbing.embedded import server_executable

    found = [("valkey", server_executable())]
    system = shutil.which("redis-server")
    if system is not None and os.path.realpath(system) != os.path.realpath(found[0][1]):
        version = subprocess.run([system, "--version"], capture_output=True, text=True).stdout
        major = version.partition(" v=")[2].partition(".")[0]
        if major.isdigit() and int(major) >= 7:
            found.append(("redis", system))
    return found
