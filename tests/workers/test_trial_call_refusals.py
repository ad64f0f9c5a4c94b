"""A remote trial's call is answered at once, a refusal with its reason: a call over a limit the
broker enforces is refused on the worker before it is sent, naming the limit; a call the broker
refuses gets the broker's reason. Only a call that proves no worker given the job sent it goes
unanswered (an answer would land on that worker's reply list).

The limits on a real worker process; the broker's refusals with real Redis and the real
dispatcher, the calls made by `RemoteTrial` from the requests taken off the real queue (as
tests/dispatch/test_attempt_tokens.py does), each refusal path of `dispatch.calls` one case.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from typing import Any

import optuna
import pytest
import redis
from optuna.trial import TrialState

from optuna_rq import Optimizer
from optuna_rq.dispatch import Budget, Dispatcher, RunSpec, StudyRun
from optuna_rq.dispatch.boundary import Site
from optuna_rq.errors import RemoteTrialError
from optuna_rq.protocol import (
    CALL_FIELD,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_CONTAINER_LEN,
    MAX_DEPTH,
    Keys,
    Record,
    Role,
    Signer,
    TrialCall,
    TrialCallReply,
    TrialMethod,
    TrialRequest,
    generate_keyrings,
)
from optuna_rq.protocol.codec import pack
from optuna_rq.study.verdict import FAIL_ERROR_ATTR
from optuna_rq.workers.remote_trial import RemoteTrial
from tests.support.helpers import wait_until
from tests.support.inline_workers import InlineWorkers

pytestmark = pytest.mark.timeout(120)

RINGS = generate_keyrings()
BROKER, WORKER = (Signer(keyring=RINGS[role]) for role in (Role.BROKER, Role.WORKER))
OTHER_WORKER = Signer(keyring=generate_keyrings()[Role.WORKER])  # another key set's


# -- over a limit: refused on the worker ---------------------------------------------------------


def test_a_call_over_a_limit_raises_at_once_on_the_worker_naming_it(
    redis_url: str, inline_workers: InlineWorkers
) -> None:
    prefix = inline_workers.start(count=1, modules=("tests.support.trial_objectives",))
    study = optuna.create_study()
    Optimizer(
        "tests.support.trial_objectives:over_the_limits",  # type: ignore[arg-type]
        concurrency=1,
        n_trials=1,
        study=study,
        redis_url=redis_url,
        prefix=prefix,
    ).run()
    [trial] = study.trials
    assert trial.state is TrialState.COMPLETE, trial.user_attrs.get(FAIL_ERROR_ATTR)
    outcomes = trial.user_attrs["outcomes"]
    size_limit = f"over the {DEFAULT_MAX_MESSAGE_BYTES:,}-byte message limit"
    size_fix = "raise --max-message-bytes (OPTUNA_RQ_MAX_MESSAGE_BYTES) on the broker and"
    items_limit = f"over the {MAX_CONTAINER_LEN:,} a list or map in a message may hold"
    depth_limit = f"nests deeper than the {MAX_DEPTH} levels a message may hold"
    expected = {
        "user_attr": ("trial.set_user_attr", size_limit, size_fix),
        "system_attr": ("trial.set_system_attr", size_limit, size_fix),
        "categorical_bytes": ("trial.suggest_categorical", size_limit, size_fix),
        "categorical_items": ("trial.suggest_categorical", items_limit, "pass fewer"),
        "nested_list": ("trial.set_user_attr", items_limit, "args[1]['rows'] holds 20,000"),
        "deep": ("trial.set_user_attr", depth_limit, "the broker enforces"),
    }
    assert set(outcomes) == set(expected)
    for name, (method, limit, fix) in expected.items():
        kind, message = outcomes[name]
        assert kind == "RemoteTrialError", (name, kind, message)
        assert message.startswith(method) and limit in message and fix in message, (name, message)
    # Nothing of the refused calls reached the study.
    assert set(trial.params) == {"x"} and "blob" not in trial.user_attrs


# -- refused by the broker: answered with its reason ---------------------------------------------


@dataclasses.dataclass
class Served:
    """A dispatcher serving calls in a thread; `request` is trial 0's job, as a worker takes it."""

    conn: redis.Redis
    prefix: str
    dispatcher: Dispatcher
    run: StudyRun
    request: TrialRequest

    def trial(self, signer: Signer = WORKER, **changes: Any) -> RemoteTrial:
        """A remote trial of trial 0's request, or of another attempt this broker issued (the
        token its job would carry: only the worker given that job holds it)."""
        request = dataclasses.replace(self.request, **changes)
        if changes:
            token = BROKER.attempt_token(Keys.job_id(request.attempt_id))
            request = dataclasses.replace(request, token=token)
        return RemoteTrial(self.conn, request, signer, keys=Keys(self.prefix))

    def push(self, call: TrialCall | dict[str, Any], signer: Signer = WORKER) -> None:
        """Append a call to the result stream as a worker would, or a raw map as one might."""
        body = call.encode() if isinstance(call, TrialCall) else pack(call)
        self.conn.xadd(self.request.reply_to, {CALL_FIELD: signer.seal(Record.CALL, body)})

    def replies(self) -> list[TrialCallReply]:
        raw: list[bytes] = self.conn.lrange(Keys.reply_list(self.request.attempt_id), 0, -1)  # type: ignore[assignment]
        return [TrialCallReply.decode(WORKER.open(Record.REPLY, r)) for r in raw]

    def refused(self) -> dict[str, int]:
        stored: dict[bytes, bytes] = self.conn.hgetall(Keys(self.prefix).refused)  # type: ignore[assignment]
        return {k.decode(): int(v) for k, v in stored.items()}


@pytest.fixture
def served(conn: redis.Redis, prefix: str) -> Iterator[Served]:
    study = optuna.create_study()
    dispatcher = Dispatcher(conn, prefix=prefix, reply_to=f"{prefix}:results", signer=BROKER)
    run = StudyRun(
        study=study,
        spec=RunSpec(
            objective="tests.support.trial_objectives:plain",
            inputs={},
            concurrency=1,
        ),
        budget=Budget(1),
    )
    dispatcher.add(run)
    wait_until(lambda: dispatcher.refill() >= 0 and len(run.outstanding) == 1, timeout_s=10)
    queue = dispatcher.sender.queue(run)
    [job_id] = queue.get_job_ids()
    job = queue.fetch_job(job_id)
    assert job is not None
    request = TrialRequest.decode(WORKER.open(Record.REQUEST, job.args[0]))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            dispatcher.poll(0.05)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        yield Served(conn, prefix, dispatcher, run, request)
    finally:
        stop.set()
        server.join(timeout=10)


def _not_running(s: Served) -> object:
    return s.trial(attempt=2).suggest_float("x", 0, 1)  # attempt 1 runs, not a retry


def _faulted(s: Served) -> object:
    s.dispatcher.boundary.record(s.run.name, Site.TELL, RuntimeError("the storage said no"))
    return s.trial().suggest_float("x", 0, 1)


def _answer_over_the_cap(s: Served) -> object:
    [frozen] = s.run.study.trials
    s.run.study._storage.set_trial_user_attr(frozen._trial_id, "big", "x" * 1_100_000)
    return s.trial().user_attrs


def _answer_that_cannot_travel(s: Served) -> object:
    s.run.study.set_user_attr("a set", {1, 2})  # the in-memory storage keeps it as it is
    return s.trial().study.user_attrs


def _unknown_method(s: Served) -> object:
    return s.trial()._call("no_such_method")


def _optuna_refuses(s: Served) -> object:
    trial = s.trial()
    trial.suggest_float("x", 0, 1)
    return trial.suggest_int("x", 0, 1)  # another distribution for "x": Optuna's ValueError


def _over_the_brokers_cap(s: Served) -> object:
    # A worker allowed larger messages than its broker: its own check lets the call go.
    roomy = Signer(keyring=RINGS[Role.WORKER], max_message_bytes=4 * DEFAULT_MAX_MESSAGE_BYTES)
    return s.trial(signer=roomy).set_user_attr("blob", "x" * 2_000_000)


# Every path of `CallServer.serve` that refuses a call it can answer: how the objective's call
# reaches it, the exception the objective gets, and what its message says.
ANSWERED: dict[str, tuple[Callable[[Served], object], type[Exception], str]] = {
    "not running": (_not_running, RemoteTrialError, "is not running on this broker"),
    "study faulted": (_faulted, RemoteTrialError, "failed on the broker: RuntimeError: the st"),
    "answer over the cap": (_answer_over_the_cap, RemoteTrialError, "-byte message limit"),
    "answer cannot travel": (_answer_that_cannot_travel, RemoteTrialError, "cannot travel"),
    "unknown method": (_unknown_method, RemoteTrialError, "unknown trial method"),
    "Optuna refuses": (_optuna_refuses, ValueError, "Cannot set different distribution kind"),
    "over the broker's cap": (_over_the_brokers_cap, RemoteTrialError, "up to 1048576 bytes"),
}


@pytest.mark.parametrize("case", list(ANSWERED))
def test_a_call_the_broker_refuses_raises_at_once_with_its_reason(
    served: Served, case: str
) -> None:
    make_the_call, raised, reason = ANSWERED[case]
    with pytest.raises(raised, match=reason) as info:
        make_the_call(served)
    assert "no answer" not in str(info.value)


def test_a_call_the_broker_cannot_read_is_answered_with_why(served: Served) -> None:
    """From a worker of another version (a field this one refuses), pushed as it would push it:
    its attempt and token are read without decoding the rest, and it gets the reason."""
    call = TrialCall(
        study=served.request.study,
        incarnation=served.request.incarnation,
        trial_number=served.request.trial_number,
        attempt=served.request.attempt,
        seq=7,
        method="suggest_float",
        args=["x", 0, 1],
        kwargs={},
        reply=True,
        token=served.request.token,
    )
    served.push({**call.to_wire(), "v": 4, "since_v4": "a field"})
    wait_until(served.replies, timeout_s=10)
    [reply] = served.replies()
    assert reply.answers(call) and not reply.ok
    assert "the broker refused this call" in (reply.error or "")
    assert "unknown fields ['since_v4']" in (reply.error or "")
    assert served.refused().get("call") == 1


def _forged_seal(s: Served, call: TrialCall) -> None:
    s.push(call, signer=OTHER_WORKER)


def _unissued_token(s: Served, call: TrialCall) -> None:
    s.push(dataclasses.replace(call, token="0" * 32))


def _unreadable_unissued(s: Served, call: TrialCall) -> None:
    s.push({**dataclasses.replace(call, token="0" * 32).to_wire(), "v": 4})


# The refusals that go unanswered, on purpose: nothing proves the worker given the job sent them,
# and their answer would be taken by that worker for the answer to its call of that number.
UNANSWERED: dict[str, tuple[Callable[[Served, TrialCall], None], str]] = {
    "a seal that does not open": (_forged_seal, "call"),
    "a token not issued": (_unissued_token, "call token"),
    "unreadable, with a token not issued": (_unreadable_unissued, "call"),
}


@pytest.mark.parametrize("case", list(UNANSWERED))
def test_a_call_no_worker_given_the_job_sent_is_refused_unanswered(
    served: Served, case: str
) -> None:
    forge, counted_as = UNANSWERED[case]
    trial = served.trial()
    call = TrialCall(
        study=served.request.study,
        incarnation=served.request.incarnation,
        trial_number=served.request.trial_number,
        attempt=served.request.attempt,
        seq=1,  # the number of the trial's own next call
        method="should_prune",
        args=[],
        kwargs={},
        reply=True,
        token=served.request.token,
    )
    forge(served, call)
    wait_until(lambda: served.refused().get(counted_as) == 1, timeout_s=10)
    # The worker's own call 1, read after the forged one: had that been answered, its answer
    # would be on the list first, and taken for this one's.
    assert trial.suggest_float("x", 0, 1) == trial.params["x"]
    assert trial.dropped_replies == 0 and served.replies() == []


# -- calls that only record: sent without a wait -------------------------------------------------


def test_a_call_that_only_records_is_not_answered_and_is_applied_before_the_next_call(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    trial = served.trial()
    sent: list[TrialCall] = []
    sealed = RemoteTrial._sealed  # every call the worker sends is sealed there

    def spy(trial: RemoteTrial, method: TrialMethod, payload: bytes) -> bytes:
        sent.append(TrialCall.decode(payload))
        return sealed(trial, method, payload)

    monkeypatch.setattr(RemoteTrial, "_sealed", spy)
    trial.report(0.5, 0)
    trial.set_user_attr("note", {"k": [1, 2]})
    trial.set_constraint("c", 0.25)
    # The next call that answers sees them all: the broker read them first, in order.
    assert trial.intermediate_values == {0: 0.5}
    assert trial.user_attrs == {"note": {"k": [1, 2]}}
    assert trial.constraints == {"c": 0.25}
    # Only that read asked for an answer, and took it.
    assert [(c.method, c.reply) for c in sent] == [
        (TrialMethod.REPORT, False),
        (TrialMethod.SET_USER_ATTR, False),
        (TrialMethod.SET_CONSTRAINT, False),
        (TrialMethod.TRIAL, True),
    ]
    assert served.replies() == [] and trial.dropped_replies == 0
    # What Optuna raises or warns for them is decided on the worker, with Optuna's words.
    with pytest.warns(UserWarning, match=r"The reported value is ignored because this `step=0`"):
        trial.report(0.75, 0)
    with pytest.raises(TypeError, match="not JSON serializable"):
        trial.set_user_attr("raw", b"bytes")  # the wire carries them; the storage does not
    assert trial.intermediate_values == {0: 0.5} and "raw" not in trial.user_attrs
