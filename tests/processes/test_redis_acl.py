"""Least privilege in Redis: each role (broker, workers, front doors, a remote Optimizer) runs as
its own ACL user, with the rules of deploy/redis/redis-acl.conf, on a real redis-server and on
the embedded valkey-server. A whole study goes through every role without one command refused (ACL
LOG stays empty), and every write a role must not make is refused by Redis (NOPERM), key class
by key class."""

from __future__ import annotations

import inspect
import os
import shlex
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import redis
import yaml
from optuna.trial import TrialState
from rq import Worker

from optuna_rq import Optimizer, suggest
from optuna_rq.client import BrokerClient
from optuna_rq.daemon import BrokerSettings, Daemon
from optuna_rq.protocol import (
    GROUP,
    WAKE_FIELD,
    AttemptId,
    Delete,
    Keys,
    Record,
    Signer,
    StudySpec,
    StudyState,
    trial_queue,
)
from tests.support.helpers import wait_until
from tests.support.redis_acl import (
    ADMIN,
    DEPLOY,
    PREFIX,
    ROLES,
    RULES,
    AclServer,
    acl_server,
    acl_servers,
    password_of,
    write_acl_file,
)
from tests.support.worker_processes import cli, cli_env, live_workers, stop_process

pytestmark = pytest.mark.timeout(300)

SECRET = "acl-test-secret-0123456789abcdef"
"""Every role signs (a shared secret): the signed paths are the ones exercised."""
TOKEN = "0123456789abcdef0123456789abcdef"
"""A private result stream's token (32 hex digits, as `Optimizer` makes)."""


@pytest.fixture(params=acl_servers(), ids=lambda server: server[0])
def server(request: pytest.FixtureRequest) -> Iterator[AclServer]:
    """A server of each kind here (valkey, and Redis 7+ if installed) with the deploy ACL."""
    with acl_server(request.param[1]) as started:
        yield started


# -- the rules file and the script that writes Redis's ACL file ---------------------------------


def test_the_script_writes_every_role_with_its_password_hash_and_no_password(
    tmp_path: Path,
) -> None:
    said = write_acl_file(tmp_path / "all.acl")
    text = (tmp_path / "all.acl").read_text()
    assert said == "" and (tmp_path / "all.acl").stat().st_mode & 0o077 == 0
    users = [line.split()[1] for line in text.splitlines()]
    assert users == ["default", *ROLES, ADMIN]
    assert "user default off" in text.splitlines()
    for role in ROLES:
        assert password_of(role) not in text
        [line] = [line for line in text.splitlines() if line.startswith(f"user {role} ")]
        assert line.split()[2:4][0] == "reset" and line.split()[3].startswith("#")
    # A role whose password is not given cannot log in: it is written off, and said so.
    said = write_acl_file(tmp_path / "some.acl", users=("broker", "worker", "client"))
    assert "REDIS_PASSWORD_OPTIMIZER is not set: user optimizer is off" in said
    assert "user optimizer off resetpass" in (tmp_path / "some.acl").read_text().splitlines()


def test_a_private_stream_pattern_is_exactly_a_token_long() -> None:
    """The rules name private result streams by 32 `?`: as long as the token `Keys` allows."""
    patterns = [word for word in RULES.read_text().split() if "results:?" in word]
    assert patterns, "no private stream pattern in the rules"
    for word in patterns:
        run = word.partition("results:")[2]
        assert run[:32] == "?" * 32 and run[32:33] in ("", ":"), word
    assert Keys(PREFIX).private_results(TOKEN).endswith(TOKEN)
    for bad in (TOKEN[:-1], TOKEN + "0", TOKEN.upper(), f"{TOKEN[:-6]}:lease"):
        with pytest.raises(ValueError):
            Keys(PREFIX).private_results(bad)


# -- a study through every role, each as its own user -------------------------------------------


def _cli(server: AclServer, state: Path, line: str, *, check: bool = True) -> str:
    """Run `optuna-rq LINE` as a front door (the client user); its stdout, or with `check`
    false its exit code."""
    done = subprocess.run(
        cli("--redis-url", server.url("client"), "--prefix", PREFIX, *shlex.split(line)),
        env=cli_env(
            **server.env("client", OPTUNA_RQ_STATE_DIR=str(state), OPTUNA_RQ_SECRET=SECRET)
        ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert not check or done.returncode == 0, (line, done.stdout, done.stderr)
    return done.stdout if check else f"{done.returncode}"


def test_every_role_runs_a_study_as_its_own_user_and_nothing_is_refused(
    server: AclServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers (running plain and define-by-run trials, cancelled ones too), the broker, every
    front-door command, and a remote Optimizer (define-by-run, and one whose callback stops it
    with trials running), each on its own user: ACL LOG is empty afterwards."""
    state = tmp_path / "state"
    state.mkdir()
    admin = server.connect(ADMIN)
    worker_log = tmp_path / "workers.log"
    with open(worker_log, "wb") as out:
        workers = subprocess.Popen(
            cli("--redis-url", server.url("worker"), "--prefix", PREFIX, "workers", "--count", "3")
            + [
                "--import",
                "tests.support.objectives",
                "--import",
                "tests.support.trial_objectives",
            ],
            env=cli_env(**server.env("worker", OPTUNA_RQ_SECRET=SECRET)),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    broker_log = tmp_path / "broker.log"
    with open(broker_log, "wb") as out:
        broker = subprocess.Popen(
            cli("--redis-url", server.url("broker"), "--prefix", PREFIX, "broker"),
            env=cli_env(
                **server.env("broker", OPTUNA_RQ_STATE_DIR=str(state), OPTUNA_RQ_SECRET=SECRET)
            ),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        queue = trial_queue(admin, Keys(PREFIX).trial_queue("tests.support.objectives"))
        wait_until(
            lambda: (
                live_workers(admin, PREFIX, Signer(SECRET.encode())) >= 3
                and len(Worker.all(connection=admin, queue=queue)) >= 3
            ),
            timeout_s=60,
            message=f"workers did not start: {worker_log.read_text()}",
        )
        wait_until(lambda: admin.exists(f"{PREFIX}:broker"), timeout_s=30, message="no broker")

        # The front doors: the CLI, and BrokerClient in a script (what the CLI's other
        # commands call), as the client user.
        x, few = "--param 'x={type: float, low: 0, high: 4}'", "--n-trials 4 --concurrency 2"
        _cli(
            server,
            state,
            f"submit tests.support.objectives:quadratic --study-name quad {x} {few} --wait",
        )
        calls = f"--study-name calls {few} --wait"  # define-by-run: calls and replies
        _cli(server, state, f"submit tests.support.trial_objectives:surface_single {calls}")
        slow = f"--study-name slow {x} --param hold_s=600 --n-trials 50 --concurrency 2"
        _cli(server, state, f"submit tests.support.objectives:sleeps {slow}")
        front = BrokerClient(server.connect("client"), PREFIX, signer=Signer(SECRET.encode()))
        enqueued = front.enqueue_commands("slow", [{"x": 0.5}])
        front.send(*enqueued)
        wait_until(lambda: front.receipts(enqueued), timeout_s=60, message="no receipt")
        assert [r.new for r in front.receipts(enqueued).values()] == [1]
        front.change("slow", concurrency=1)
        wait_until(
            lambda: front.require_status("slow").running >= 1,
            timeout_s=60,
            message="no trial of `slow` started",
        )
        _cli(server, state, "cancel slow")  # its running trial: a cancel mark for its worker
        assert _cli(server, state, "wait slow", check=False) == "1"  # cancelled
        listed = _cli(server, state, "status")
        assert all(name in listed for name in ("quad", "calls", "slow")), listed
        assert len(_cli(server, state, "trials quad --format csv").splitlines()) == 5  # published
        front.send(Delete(study="slow", force=False, purge=True))
        wait_until(lambda: front.status("slow") is None, timeout_s=30, message="not deleted")
        assert front.served_modules("default") == [
            "tests.support.objectives",
            "tests.support.trial_objectives",
        ]

        # A remote Optimizer, as its own user: define-by-run (calls and replies on its private
        # stream), then one whose callback stops it with trials running (cancel marks there).
        monkeypatch.setenv("OPTUNA_RQ_REDIS_PASSWORD", password_of("optimizer"))
        monkeypatch.setenv("OPTUNA_RQ_SECRET", SECRET)
        url = server.url("optimizer")
        opt = Optimizer(
            "tests.support.objectives:define_by_run", 2, 4, redis_url=url, prefix=PREFIX
        )
        opt.run()
        assert [t.state for t in opt.study.trials] == [TrialState.COMPLETE] * 4
        assert all(t.user_attrs["pid"] != os.getpid() for t in opt.study.trials)  # on workers

        def stop_after_one(study: optuna.Study, trial: object) -> None:
            raise RuntimeError("enough")

        study = optuna.create_study()
        study.enqueue_trial({"x": 0.1, "hold_s": 0.05})  # told first: the callback stops the run
        study.enqueue_trial({"x": 0.2, "hold_s": 600})  # running then: cancelled
        stopped = Optimizer(
            "tests.support.objectives:sleeps",
            2,
            6,
            study=study,
            redis_url=url,
            prefix=PREFIX,
            callbacks=[stop_after_one],
        )
        with pytest.raises(RuntimeError, match="enough"):
            stopped.run(x=suggest.float(0, 1), hold_s=suggest.category([0.05, 600]))
    finally:
        assert stop_process(broker) == 0, broker_log.read_text()
        assert stop_process(workers) == 0, worker_log.read_text()
    states = [t.state for t in stopped.study.trials]
    assert TrialState.RUNNING not in states and TrialState.FAIL in states, states
    assert server.denials() == [], broker_log.read_text()[-3000:]


# -- every forbidden write, key class by key class ----------------------------------------------

_ATTEMPT = {"study": "s", "incarnation": "0123456789ab", "trial_number": 0, "attempt": 1}
_QUEUE = f"{PREFIX}:default:tests.support.objectives"
_JOB = Keys.job_id(AttemptId(reply_to=f"{PREFIX}:results", **_ATTEMPT))  # type: ignore[arg-type]


def key_classes() -> dict[str, str]:
    """A key of every class optuna-rq and RQ write: the prefix's (every attribute and key-making
    method of `Keys`, per attempt on the broker's result stream and on a private one), RQ's,
    and another prefix's."""
    keys = Keys(PREFIX)
    named = {name: value for name, value in vars(keys).items() if name != "prefix"}
    private = keys.private_results(TOKEN)
    ours = AttemptId(reply_to=keys.results, **_ATTEMPT)  # type: ignore[arg-type]
    mine = AttemptId(reply_to=private, **_ATTEMPT)  # type: ignore[arg-type]
    return {
        **named,
        "generation": f"{keys.broker}:generation",  # the lock's (daemon/lock.py)
        "pool": keys.pool("a-pool"),
        "backlog_of": keys.backlog_of("s"),
        "receipt": keys.receipt("0" * 32),
        "trials_of": keys.trials_of("s"),
        "driven_trials_of": keys.driven_trials_of("s"),
        "private_results": private,
        "lease": Keys.lease(ours),
        "cancel": Keys.cancel(ours),
        "reply_list": Keys.reply_list(ours),
        "private lease": Keys.lease(mine),
        "private cancel": Keys.cancel(mine),
        "private reply_list": Keys.reply_list(mine),
        "rq job": f"rq:job:{_JOB}",
        "rq results": f"rq:results:{_JOB}",
        "rq queue": f"rq:queue:{_QUEUE}",
        "rq queues": "rq:queues",
        "rq registry": f"rq:wip:{_QUEUE}",
        "rq worker": "rq:worker:w",
        "rq workers": "rq:workers",
        "another prefix": "other-prefix:commands",
    }


def test_the_key_classes_name_every_key_keys_makes() -> None:
    """A new key in `Keys` (an attribute or a method making one) fails here until it is placed
    in the table below (`MAY_WRITE`) and in deploy/redis/redis-acl.conf."""
    keys = Keys(PREFIX)
    attributes = {name for name in vars(keys) if name != "prefix"}
    assert attributes == {
        "broker",
        "broker_turn",
        "epoch",
        "commands",
        "studies",
        "status",
        "driven",
        "results",
        "dropped",
        "refused",
        "pools",
        "demand",
        "backlog",
        "wake",
    }
    methods = {
        name
        for name, member in inspect.getmembers(Keys, inspect.isfunction)
        if not name.startswith("_")
    }
    helpers = {
        "job_id",
        "batch_job_id",
        "carried",
        "prefix_of",
        "queue_class",
        "parse_trial_queue",
        "trial_queue",
    }
    assert methods - helpers == {
        "pool",
        "backlog_of",
        "receipt",
        "trials_of",
        "driven_trials_of",
        "private_results",
        "lease",
        "cancel",
        "reply_list",
    }
    assert set(key_classes()) >= attributes | (methods - helpers)


ALL = None
"""Every write command, on a key class a role may write."""
_RQ = {name: ALL for name in key_classes() if name.startswith("rq ")}
MAY_WRITE: dict[str, dict[str, set[str] | None]] = {
    "broker": {name: ALL for name in key_classes() if name != "another prefix"},
    "worker": {
        **_RQ,
        **dict.fromkeys(("pools", "pool", "refused", "dropped"), ALL),
        **dict.fromkeys(("lease", "reply_list", "private lease", "private reply_list"), ALL),
        "results": {"XADD"},
        "private_results": {"XADD"},
    },
    "client": {
        "commands": {"RPUSH"},
        "wake": {"XADD"},
        "driven": {"HDEL"},  # `delete` of an Optimizer's ended study
        "driven_trials_of": {"DEL"},
    },
    "optimizer": {
        **_RQ,
        **dict.fromkeys(("private_results", "private lease", "private cancel"), ALL),
        **dict.fromkeys(("private reply_list", "refused", "dropped"), ALL),
        "driven": {"HSET"},  # the status of the study it runs
        "driven_trials_of": {"HSET"},  # and its trials, as the broker publishes its own
    },
}
"""What each role may write (None: with any command; else with these only). Every other write
is refused."""

WRITES = {
    "DEL": ("DEL", "{key}"),
    "SET": ("SET", "{key}", "x"),
    "HSET": ("HSET", "{key}", "f", "x"),
    "HDEL": ("HDEL", "{key}", "f"),
    "HINCRBY": ("HINCRBY", "{key}", "f", "1"),
    "RPUSH": ("RPUSH", "{key}", "x"),
    "LTRIM": ("LTRIM", "{key}", "1", "0"),
    "SADD": ("SADD", "{key}", "x"),
    "SREM": ("SREM", "{key}", "x"),
    "XADD": ("XADD", "{key}", "*", "f", "x"),
    "XTRIM": ("XTRIM", "{key}", "MAXLEN", "0"),
    "XACK": ("XACK", "{key}", GROUP, "0-1"),
    "XGROUP": ("XGROUP", "CREATE", "{key}", "g", "$", "MKSTREAM"),
    "PEXPIRE": ("PEXPIRE", "{key}", "1"),
    "RENAME": ("RENAME", "{key}", "{key}"),
}
"""One write of each kind the roles use, and a few they do not."""


def _as(connection: redis.Redis, words: tuple[str, ...], key: str) -> object:
    return connection.execute_command(*(word.format(key=key) for word in words))


@pytest.mark.parametrize("role", ROLES)
def test_every_write_a_role_may_not_make_is_refused(server: AclServer, role: str) -> None:
    """Each role tries every write (`WRITES`) on a key of every class (`key_classes`) it may not
    write: Redis refuses each one (NOPERM), before it runs. What it may write, Redis would let
    it (ACL DRYRUN, which runs nothing)."""
    connection, admin = server.connect(role), server.connect(ADMIN)
    allowed = MAY_WRITE[role]
    tried = 0
    for name, key in key_classes().items():
        commands = allowed.get(name, set())
        for command, words in WRITES.items():
            if commands is ALL or command in commands:
                args = [word.format(key=key) for word in words]
                assert admin.acl_dryrun(role, *args) == b"OK", (role, name, command)
                continue
            with pytest.raises(redis.exceptions.NoPermissionError):
                _as(connection, words, key)
            tried += 1
    assert tried and server.denials(), "nothing was refused: the probes probed nothing"
    assert admin.dbsize() == 0  # nothing refused ran (and DRYRUN runs nothing)


@pytest.mark.parametrize("role", ROLES)
def test_no_role_runs_a_dangerous_command_or_publishes(server: AclServer, role: str) -> None:
    connection = server.connect(role)
    dangerous = [
        ("FLUSHALL",),
        ("CONFIG", "SET", "dir", "/tmp"),
        ("KEYS", "*"),
        ("ACL", "SETUSER", role, "+@all"),
        ("PUBLISH", "rq:pubsub:w", "x"),
    ]
    for words in dangerous:
        with pytest.raises(redis.exceptions.NoPermissionError):
            connection.execute_command(*words)
    admin = server.connect(ADMIN)
    # Nobody subscribes: workers skip RQ's command channel (the pool supervises them).
    assert admin.acl_dryrun(role, "SUBSCRIBE", "rq:pubsub:w") != b"OK"
    assert admin.acl_dryrun(role, "SUBSCRIBE", "other") != b"OK"


def test_what_the_workers_and_a_front_door_may_not_read(server: AclServer) -> None:
    """Specs and status name storage URLs (with their credentials, for a database): a worker
    and an Optimizer cannot read them, nor the command inbox, nor the trials the broker
    publishes for the front doors; a front door reads nothing of RQ's and no result stream."""
    keys, admin = Keys(PREFIX), server.connect(ADMIN)
    unreadable = {
        "worker": [keys.studies, keys.status, keys.commands, keys.backlog, keys.epoch],
        "optimizer": [keys.studies, keys.status, keys.commands, keys.results, keys.epoch],
        "client": [keys.results, keys.private_results(TOKEN), f"rq:job:{_JOB}", keys.epoch],
    }
    for role in ("worker", "optimizer"):  # what the broker publishes for the front doors
        unreadable[role].append(keys.trials_of("s"))
    unreadable["worker"].append(keys.driven_trials_of("s"))
    for role, names in unreadable.items():
        for key in names:
            assert admin.acl_dryrun(role, "DUMP", key) != b"OK", (role, key)
            with pytest.raises(redis.exceptions.NoPermissionError):
                server.connect(role).execute_command("DUMP", key)


# -- the wake stream ----------------------------------------------------------------------------


def test_a_command_wakes_the_broker_at_once_through_the_wake_stream(server: AclServer) -> None:
    """The broker's loop waits on Redis up to its poll interval (here a minute); a front door's
    command, which can write no result stream, still wakes it at once, and what woke it is
    acknowledged and deleted: the wake stream stays empty."""
    keys = Keys(PREFIX)
    settings = BrokerSettings(prefix=PREFIX, storage="memory", poll_s=60.0)
    daemon = Daemon(server.connect("broker"), settings, Signer(SECRET.encode()))
    client = BrokerClient(server.connect("client"), PREFIX, signer=Signer(SECRET.encode()))
    admin = server.connect(ADMIN)
    stop = threading.Event()
    loop = threading.Thread(target=daemon.run, args=(stop,), daemon=True)
    loop.start()
    try:
        wait_until(lambda: admin.exists(keys.broker_turn), timeout_s=30, message="no broker turn")
        spec = StudySpec(
            name="woken",
            objective="tests.support.objectives:quadratic",
            space={"x": {"type": "float", "low": 0, "high": 1}},
            n_trials=1,
            concurrency=1,
        )
        client.submit(spec)
        # Taken long before the poll interval ends (a minute): woken, not timed out.
        wait_until(
            lambda: client.require_status("woken").state is StudyState.RUNNING,
            timeout_s=20,
            message="the broker did not take the command before its poll interval",
        )
        wait_until(lambda: admin.xlen(keys.wake) == 0, timeout_s=10, message="wake kept")
        [group] = admin.xinfo_groups(keys.wake)
        assert group["name"] == GROUP.encode() and group["pending"] == 0
        assert not admin.exists(keys.results) or all(
            b"w" not in fields for _id, fields in admin.xrange(keys.results)
        )
    finally:
        stop.set()
        server.connect("client").xadd(keys.wake, {WAKE_FIELD: b""})  # the loop sees `stop` now
        loop.join(timeout=30)
    assert not loop.is_alive()
    assert server.denials() == []


def test_the_wake_stream_stays_short_while_no_broker_reads_it(server: AclServer) -> None:
    keys = Keys(PREFIX)
    client = BrokerClient(server.connect("client"), PREFIX, signer=Signer(SECRET.encode()))
    for n in range(40):
        client.submit(
            StudySpec(
                name=f"s{n}",
                objective="tests.support.objectives:quadratic",
                space={},
                n_trials=1,
                concurrency=1,
            )
        )
    admin = server.connect(ADMIN)
    assert admin.llen(keys.commands) == 40 and 0 < admin.xlen(keys.wake) <= 16
    # Each waits as queued, read from the inbox: a front door writes no status.
    statuses = client.statuses()
    assert [s.name for s in statuses] == sorted(f"s{n}" for n in range(40))
    assert {s.state for s in statuses} == {StudyState.QUEUED} and not admin.exists(keys.status)
    # Taken and stored by a broker, its status not published yet: queued too.
    stored = StudySpec(
        name="stored",
        objective="tests.support.objectives:quadratic",
        space={},
        n_trials=1,
        concurrency=1,
    )
    sealed = Signer(SECRET.encode()).seal(Record.SPEC, stored.encode(), bound_to="stored")
    admin.hset(keys.studies, "stored", sealed)
    assert client.require_status("stored").state is StudyState.QUEUED
    assert client.status("unknown") is None
    assert server.denials() == []


# -- the deployments start Redis with these users -----------------------------------------------


def _deploy_commands() -> list[tuple[str, str]]:
    """(where, shell command) starting Redis in deploy/compose.yaml and deploy/kubernetes."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["redis"]
    statefulset = next(
        doc
        for doc in yaml.safe_load_all((DEPLOY / "kubernetes" / "redis.yaml").read_text())
        if doc["kind"] == "StatefulSet"
    )
    [container] = statefulset["spec"]["template"]["spec"]["containers"]
    compose_command = compose["command"][-1].replace("$$", "$")  # compose's escape
    compose_command = compose_command.replace("${REDIS_MAXMEMORY:-1gb}", "1gb")
    return [("compose", compose_command), ("kubernetes", container["command"][-1])]


@pytest.mark.parametrize(("where", "command"), _deploy_commands(), ids=["compose", "kubernetes"])
def test_the_deployments_start_redis_with_a_user_per_role(
    where: str, command: str, tmp_path: Path
) -> None:
    """The command compose and the Kubernetes StatefulSet start Redis with, run here (the
    mounted deploy/redis in its place, the embedded server for redis-server): each role logs in
    with its password (compose's from the environment, Kubernetes' from the Secret's files), a
    role given none is off, and nobody logs in without one."""
    from optuna_rq.plumbing.embedded import server_executable

    sock = tmp_path / "redis.sock"
    command = command.replace("/etc/optuna-rq/redis-acl", str(DEPLOY / "redis"))
    command = command.replace("/tmp/users.acl", str(tmp_path / "users.acl"))
    command = command.replace("exec redis-server ", f"exec {server_executable()} ")
    command += f" --port 0 --unixsocket {sock} --dir {tmp_path} --save ''"
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_PASSWORD_")}
    given = [r for r in ROLES if r != "optimizer"]
    if where == "kubernetes":  # the Secret optuna-rq, mounted: a file per key
        passwords = tmp_path / "passwords"
        passwords.mkdir()
        for role in given:
            (passwords / f"redis-password-{role}").write_text(password_of(role))
        command = command.replace("/etc/optuna-rq/redis-passwords", str(passwords))
        missing = f"{passwords}/redis-password-optimizer is missing or empty"
    else:
        env.update({f"REDIS_PASSWORD_{r.upper()}": password_of(r) for r in given})
        missing = "REDIS_PASSWORD_OPTIMIZER is not set"
    with open(tmp_path / "redis.log", "wb") as log:
        process = subprocess.Popen(["sh", "-c", command], env=env, stdout=log, stderr=log)
    try:
        as_client = redis.Redis(
            unix_socket_path=str(sock), username="client", password=password_of("client")
        )

        def up() -> bool:
            assert process.poll() is None, (tmp_path / "redis.log").read_text()
            try:
                return bool(sock.exists() and as_client.ping())
            except redis.ConnectionError:
                return False

        wait_until(up, timeout_s=15, message=f"{where}'s Redis did not start")
        for role in ("broker", "worker"):
            user = redis.Redis(
                unix_socket_path=str(sock), username=role, password=password_of(role)
            )
            assert user.acl_whoami() == role
        for user, password in (("optimizer", password_of("optimizer")), ("default", None)):
            with pytest.raises(redis.exceptions.AuthenticationError):
                redis.Redis(unix_socket_path=str(sock), username=user, password=password).ping()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(unix_socket_path=str(sock)).ping()  # no default user
        assert (tmp_path / "users.acl").stat().st_mode & 0o077 == 0
        assert missing in (tmp_path / "redis.log").read_text()
    finally:
        process.terminate()
        process.wait(timeout=10)
