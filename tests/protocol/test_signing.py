"""Signed messages: with a shared secret, Redis write access cannot forge a trial or a result."""

from __future__ import annotations

import time
from unittest.mock import patch

import msgpack
import optuna
import pytest
import redis
from optuna.trial import TrialState
from rq.job import JobStatus

from optuna_rq import ConfigError, Optimizer, suggest
from optuna_rq.dispatch import Budget, Dispatcher, RunSpec, StudyRun
from optuna_rq.protocol import (
    RESULT_FIELD,
    RUN_TRIAL,
    Keys,
    Outcome,
    ProtocolError,
    TrialRequest,
    TrialResult,
    trial_queue,
)
from optuna_rq.protocol.keyring import generate_keyrings
from optuna_rq.protocol.signing import ENV_SECRET, Record, Role, Signer
from tests.support.helpers import wait_until
from tests.support.inline_workers import InlineWorkers

SECRET = b"0123456789abcdef0123456789abcdef"
signer = Signer(SECRET)
RINGS = generate_keyrings()
BROKER, WORKER, CLIENT = (Signer(keyring=RINGS[r]) for r in (Role.BROKER, Role.WORKER, Role.CLIENT))


def test_seal_and_open_round_trip_and_signing_off_passes_through() -> None:
    for record in Record:
        assert signer.open(record, signer.seal(record, b"body")) == b"body"
    assert Signer().seal(Record.COMMAND, b"body") == b"body"
    assert Signer().open(Record.COMMAND, b"body") == b"body"


def _envelope(**fields: object) -> bytes:
    base = {"r": "command", "by": "shared", "ts": time.time(), "body": b"x", "sig": b"\0" * 32}
    return msgpack.packb({**base, **fields})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"body", "signed command"),
        (msgpack.packb({"body": b"x"}), "is not signed"),
        (Signer(b"another secret, 32 bytes long!!!").seal(Record.COMMAND, b"x"), "bad signature"),
        (_envelope(), "bad signature"),
        (_envelope(ts="now"), "malformed"),
        (signer.seal(Record.RESULT, b"x"), "not a command"),  # another kind of record
        (CLIENT.seal(Record.COMMAND, b"x"), "bad signature"),  # a role key, not the secret
    ],
    ids=[  # the records carry the time they were sealed: ids of their own, the same everywhere
        "bare body",
        "no signature",
        "another secret",
        "zero signature",
        "malformed time",
        "another kind of record",
        "a role key",
    ],
)
def test_unsigned_and_missigned_records_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        signer.open(Record.COMMAND, raw)


def test_a_record_is_bound_to_the_name_it_was_sealed_for() -> None:
    sealed = BROKER.seal(Record.STATUS, b"finished", bound_to="a")
    assert CLIENT.open(Record.STATUS, sealed, bound_to="a") == b"finished"
    with pytest.raises(ProtocolError, match="bad signature"):
        CLIENT.open(Record.STATUS, sealed, bound_to="b")  # copied under another study's name


def test_stale_and_future_records_are_refused_where_they_age() -> None:
    for ts in (time.time() - 2 * 24 * 3600, time.time() + 3600):
        with patch("time.time", return_value=ts):
            command, status = signer.seal(Record.COMMAND, b"x"), signer.seal(Record.STATUS, b"x")
        with pytest.raises(ProtocolError, match="stale"):
            signer.open(Record.COMMAND, command)
        if ts < time.time():  # a status is current until replaced, however old
            assert signer.open(Record.STATUS, status) == b"x"
        else:
            with pytest.raises(ProtocolError, match="stale"):
                signer.open(Record.STATUS, status)


@pytest.mark.parametrize("record", list(Record))
def test_each_record_is_signed_only_by_its_roles(record: Record) -> None:
    """Every kind of record, every role: a role signs what it may, and what it may not sign is
    refused both when it tries and when a forger relabels its signature as another role's."""
    for role, own in ((Role.BROKER, BROKER), (Role.WORKER, WORKER), (Role.CLIENT, CLIENT)):
        readers = [s for s in (BROKER, WORKER, CLIENT) if s is not own]
        if role in record.signed_by:
            sealed = own.seal(record, b"x", bound_to="s")
            assert all(r.open(record, sealed, bound_to="s") == b"x" for r in readers)
            continue
        with pytest.raises(ConfigError, match=f"a {role.value} key cannot sign"):
            own.seal(record, b"x")
        ts = time.time()
        for claimed in ("broker", "worker", "client", "shared"):
            head = msgpack.packb([record.value, claimed, "", ts])
            sig = RINGS[role].sign(b"optuna-rq/2\0" + head + b"x")
            raw = msgpack.packb(
                {"r": record.value, "by": claimed, "ts": ts, "body": b"x", "sig": sig}
            )
            for reader in readers:
                with pytest.raises(ProtocolError):
                    reader.open(record, raw)


def test_role_keys_travel_as_one_line_and_are_checked(tmp_path) -> None:
    token = RINGS[Role.WORKER].to_token()
    assert token.startswith("optuna-rq-key-1:worker:") and "\n" not in token
    path = tmp_path / "worker.key"
    path.write_text(token + "\n")
    loaded = Signer.load(Role.WORKER, key_file=path)
    assert CLIENT.open(Record.RESULT, loaded.seal(Record.RESULT, b"x")) == b"x"
    with pytest.raises(ConfigError, match="holds the worker key; this process signs as the broker"):
        Signer.load(Role.BROKER, key=token)
    reader = Signer.load(None, key=token)  # a process that only reads takes any role's key
    assert reader.open(Record.STATUS, BROKER.seal(Record.STATUS, b"x")) == b"x"
    with pytest.raises(ConfigError, match="not an optuna-rq key"):
        Signer.load(Role.WORKER, key="hunter2")
    with pytest.raises(ConfigError, match="damaged key"):
        Signer.load(Role.WORKER, key=token[:-3] + "!!!")
    mixed = ":".join(
        token.split(":")[:3] + generate_keyrings()[Role.WORKER].to_token().split(":")[3:]
    )
    with pytest.raises(ConfigError, match="two different sets"):
        Signer.load(Role.WORKER, key=mixed)
    with pytest.raises(ConfigError, match="cannot read"):
        Signer.load(Role.WORKER, key_file=tmp_path / "missing.key")
    with pytest.raises(ConfigError, match="use one"):
        Signer.load(Role.WORKER, secret=SECRET, key=token)


def test_the_shared_secret_comes_from_a_file_too(tmp_path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    from_file = Signer.from_env(Role.WORKER, {"OPTUNA_RQ_SECRET_FILE": str(path)})
    assert signer.open(Record.RESULT, from_file.seal(Record.RESULT, b"x")) == b"x"


def test_a_short_secret_is_refused() -> None:
    with pytest.raises(ConfigError, match="at least 16"):
        Signer(b"short")


def _request(reply_to: str) -> TrialRequest:
    return TrialRequest(
        study="s",
        incarnation="0123456789ab",
        trial_number=0,
        attempt=1,
        objective="tests.support.objectives:quadratic",
        params={"x": 1.0},
        n_objectives=1,
        reply_to=reply_to,
    )


@pytest.mark.timeout(120)
def test_signed_workers_run_signed_trials_and_refuse_forged_ones(
    inline_workers: InlineWorkers, conn: redis.Redis, redis_url: str, prefix: str, monkeypatch
) -> None:
    queue = inline_workers.start(count=1, env={ENV_SECRET: SECRET.decode()})
    monkeypatch.setenv(ENV_SECRET, SECRET.decode())
    opt = Optimizer("tests.support.objectives:quadratic", 2, 4, redis_url=redis_url, prefix=queue)
    opt.run(x=suggest.float(0, 1))
    assert [t.state for t in opt.study.trials] == [TrialState.COMPLETE] * 4

    reply_to = f"{prefix}:forged"
    forgeries = [
        _request(reply_to).encode(),  # unsigned
        Signer(b"not the secret, but 32 bytes....").seal(
            Record.REQUEST, _request(reply_to).encode()
        ),
        # signed with the secret, but enqueued under another job id than the one its attempt
        # names (a copy of a job a Redis writer read): it would run the objective twice
        signer.seal(Record.REQUEST, _request(reply_to).encode()),
    ]
    for payload in forgeries:
        job = trial_queue(conn, Keys(queue).trial_queue("tests.support.objectives")).enqueue_call(
            RUN_TRIAL, args=(payload,)
        )
        wait_until(lambda job=job: job.get_status(refresh=True) == JobStatus.FAILED, timeout_s=30)
    assert conn.xlen(reply_to) == 0  # nothing ran, nothing was reported
    assert int(conn.hget(f"{queue}:refused", "request")) == len(forgeries)


def test_a_forged_result_is_refused_and_never_told(conn: redis.Redis, prefix: str) -> None:
    study = optuna.create_study()
    dispatcher = Dispatcher(conn, prefix=prefix, reply_to=f"{prefix}:results", signer=signer)
    run = StudyRun(
        study=study,
        spec=RunSpec(
            objective="tests.support.objectives:quadratic",
            inputs={"x": suggest.float(0, 1)},
            concurrency=1,
        ),
        budget=Budget(1),
    )
    dispatcher.add(run)
    dispatcher.refill()  # no workers: trial 0 waits in the queue
    result = TrialResult(
        study=study.study_name,
        incarnation=run.spec.incarnation,
        trial_number=0,
        attempt=1,
        outcome=Outcome.COMPLETE,
        values=[-1e9],
        fail_reason=None,
        error=None,
        worker="forger",
        duration_s=0.0,
    )
    conn.xadd(f"{prefix}:results", {RESULT_FIELD: result.encode()})  # unsigned
    assert dispatcher.poll(0.1) == 0
    assert study.trials[0].state is TrialState.RUNNING
    assert dispatcher.refused_results == 1
    assert int(conn.hget(f"{prefix}:refused", "result")) == 1

    [record] = run.in_flight()  # a signed result gives back its job's token
    token = signer.attempt_token(dispatcher.sender.job_id(run, record))
    signed = TrialResult(**{**result.to_wire(), "outcome": Outcome.COMPLETE, "token": token})
    conn.xadd(f"{prefix}:results", {RESULT_FIELD: signer.seal(Record.RESULT, signed.encode())})
    assert dispatcher.poll(0.1) == 1
    assert study.trials[0].state is TrialState.COMPLETE


def test_the_message_cap_is_configurable_and_checked(monkeypatch) -> None:
    monkeypatch.setenv("OPTUNA_RQ_MAX_MESSAGE_BYTES", "2048")
    capped = Signer.from_env(Role.CLIENT)
    assert capped.max_message_bytes == 2048
    big = _request("r")
    big = TrialRequest(
        **{**{f: getattr(big, f) for f in big.__dataclass_fields__}, "params": {"blob": "x" * 4096}}
    )
    with pytest.raises(ProtocolError, match="over the 2048-byte cap"):
        TrialRequest.decode(big.encode(), max_bytes=capped.max_message_bytes)
    monkeypatch.setenv("OPTUNA_RQ_MAX_MESSAGE_BYTES", "lots")
    with pytest.raises(ConfigError, match="OPTUNA_RQ_MAX_MESSAGE_BYTES='lots'"):
        Signer.from_env(Role.CLIENT)


def test_choosing_journal_redis_storage_warns_about_pickle(caplog) -> None:
    from optuna_rq.storage.storage_access import open_storage

    with caplog.at_level("WARNING", logger="optuna_rq.broker"):
        try:
            open_storage("redis://user:pw@127.0.0.1:1/0")
        except Exception:
            pass  # nothing listens there; the warning comes first
    [record] = [r for r in caplog.records if "unpickles" in r.getMessage()]
    assert "pw@" not in record.getMessage()


def test_an_unsigned_command_is_refused_by_a_signed_broker(
    conn: redis.Redis, prefix: str, tmp_path
) -> None:
    from optuna_rq.client import BrokerClient
    from optuna_rq.daemon import BrokerSettings, Daemon
    from optuna_rq.protocol.spec import StudySpec

    spec = StudySpec(
        name="forged",
        objective="tests.support.objectives:quadratic",
        space={},
        n_trials=1,
        concurrency=1,
    )
    daemon = Daemon(conn, BrokerSettings(prefix=prefix, storage="memory"), signer)
    daemon.acquire()
    BrokerClient(conn, prefix, signer=Signer()).submit(spec)
    daemon.step()
    assert "forged" not in daemon.specs and conn.llen(f"{prefix}:commands") == 0
    assert int(conn.hget(f"{prefix}:refused", "command")) == 1

    BrokerClient(conn, prefix, signer=signer).submit(spec)
    daemon.step()
    assert "forged" in daemon.specs
    daemon.release()
