"""The wire format: round trips, and every way a message is refused with one ProtocolError."""

from __future__ import annotations

import dataclasses
import math
import pickle
import re
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from optuna_rq.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_DEPTH,
    PROTOCOL_VERSION,
    FailReason,
    Outcome,
    ProtocolError,
    TrialRequest,
    TrialResult,
    check_params,
)
from tests.support import source_trees

INCARNATION = "0123456789ab"


def a_request(**overrides: Any) -> TrialRequest:
    fields: dict[str, Any] = {
        "study": "s",
        "incarnation": INCARNATION,
        "trial_number": 7,
        "attempt": 1,
        "objective": "pkg.mod:objective",
        "params": {"x": 0.5, "model": {"lr": 1e-3, "layers": [64, 32], "name": "mlp"}},
        "n_objectives": 1,
        "reply_to": "optuna-rq:results",
    }
    fields.update(overrides)
    return TrialRequest(**fields)


def a_result(**overrides: Any) -> TrialResult:
    fields: dict[str, Any] = {
        "study": "s",
        "incarnation": INCARNATION,
        "trial_number": 7,
        "attempt": 1,
        "outcome": Outcome.COMPLETE,
        "values": [0.25],
        "fail_reason": None,
        "error": None,
        "worker": "host:1",
        "duration_s": 0.01,
    }
    fields.update(overrides)
    return TrialResult(**fields)


def wire(message: Any, **changes: Any) -> bytes:
    """The message's encoding with fields changed, added, or (value ...) removed."""
    data = msgpack.unpackb(message.encode(), raw=False)
    for name, value in changes.items():
        if value is ...:
            del data[name]
        else:
            data[name] = value
    return msgpack.packb(data, use_bin_type=True)


def test_request_round_trip_keeps_nested_params() -> None:
    request = a_request()
    assert TrialRequest.decode(request.encode()) == request


def test_tuples_in_params_arrive_as_lists() -> None:
    decoded = TrialRequest.decode(a_request(params={"shape": (1, 2)}).encode())
    assert decoded.params == {"shape": [1, 2]}


@pytest.mark.parametrize(
    "result",
    [
        a_result(),
        a_result(values=[1.0, -2.5, math.inf]),
        a_result(outcome=Outcome.PRUNED, values=None),
        a_result(outcome=Outcome.FAIL, values=None, fail_reason=FailReason.EXCEPTION, error="boom"),
    ],
)
def test_result_round_trips(result: TrialResult) -> None:
    assert TrialResult.decode(result.encode()) == result


def test_nan_values_survive_the_wire_for_the_broker_to_judge() -> None:
    decoded = TrialResult.decode(a_result(values=[math.nan]).encode())
    assert decoded.values is not None and math.isnan(decoded.values[0])


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(min_size=1, max_size=8), json_like, max_size=6))
def test_any_carriable_params_round_trip(params: dict[str, Any]) -> None:
    request = a_request(params=params)
    assert TrialRequest.decode(request.encode()).params == params


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (a_request().encode()[:-3], "not valid msgpack"),
        (a_request().encode() + b"\x00", "bytes after the message"),
        (msgpack.packb([1, 2, 3]), "must be a msgpack map"),
        (msgpack.packb("text"), "must be a msgpack map"),
        (b"", "not valid msgpack"),
        (pickle.dumps({"study": "s"}), "not valid msgpack|bytes after the message"),
        (msgpack.packb({"x": msgpack.ExtType(1, b"data")}), "ext type 1"),
        (msgpack.packb({b"study": "s"}), "keys must be str"),
        (msgpack.packb({1: "s"}, strict_types=False), "not valid msgpack"),
    ],
)
def test_malformed_bytes_are_refused(raw: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        TrialRequest.decode(raw)


def test_not_bytes_is_refused() -> None:
    with pytest.raises(ProtocolError, match="must be bytes, got str"):
        TrialRequest.decode("hello")  # type: ignore[arg-type]


def test_size_is_checked_before_decoding() -> None:
    raw = a_request(params={"blob": "x" * 2000}).encode()
    with pytest.raises(ProtocolError, match=rf"is {len(raw)} bytes, over the 1000-byte cap"):
        TrialRequest.decode(raw, max_bytes=1000)
    huge = a_request(params={"blob": "x" * (DEFAULT_MAX_MESSAGE_BYTES + 1)}).encode()
    with pytest.raises(ProtocolError, match="over the 1048576-byte cap"):
        TrialRequest.decode(huge)


def test_nesting_deeper_than_the_bound_is_refused() -> None:
    deep: Any = 1
    for _ in range(MAX_DEPTH + 2):
        deep = {"d": deep}
    raw = wire(a_request(), params=deep)
    with pytest.raises(ProtocolError, match="nests deeper"):
        TrialRequest.decode(raw)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"extra": 1}, r"unknown fields \['extra'\]"),
        ({"study": ...}, r"missing fields \['study'\]"),
        ({"v": 1}, "protocol version 1"),
        ({"v": True}, "field 'v' must be an int"),
        ({"trial_number": True}, "'trial_number' must be an int >= 0, got bool"),
        ({"trial_number": -1}, "'trial_number' must be an int >= 0"),
        ({"trial_number": 1.0}, "'trial_number' must be an int"),
        ({"attempt": 0}, "'attempt' must be an int >= 1"),
        ({"study": 5}, "'study' must be a non-empty str, got int"),
        ({"study": ""}, "'study' must be a non-empty str"),
        ({"objective": None}, "'objective' must be a non-empty str"),
        ({"params": [1]}, "'params' must be a map, got list"),
        ({"n_objectives": 0}, "'n_objectives' must be an int >= 1"),
        ({"reply_to": b"bytes"}, "'reply_to' must be a non-empty str, got bytes"),
        ({"incarnation": ...}, r"missing fields \['incarnation'\]"),
        ({"incarnation": ""}, "'incarnation' must be an incarnation id"),
        ({"incarnation": "0123456789AB"}, "'incarnation' must be an incarnation id"),
        ({"incarnation": "0123456789ab:x"}, "'incarnation' must be an incarnation id"),
        ({"incarnation": 12}, "'incarnation' must be an incarnation id"),
        ({"v": 3}, "protocol version 3"),  # a request of before incarnations
    ],
)
def test_request_fields_are_checked(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        TrialRequest.decode(wire(a_request(), **changes))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"outcome": "DONE"}, "'outcome' must be one of COMPLETE, PRUNED, FAIL"),
        ({"fail_reason": "oops", "outcome": "FAIL", "values": None}, "'fail_reason' must be one"),
        ({"values": None}, "COMPLETE needs values"),
        ({"values": []}, "'values' must be a non-empty list of floats"),
        ({"values": ["1.0"]}, "'values' must be a non-empty list of floats"),
        ({"values": [True]}, "'values' must be a non-empty list of floats"),
        ({"outcome": "FAIL", "values": None}, "FAIL needs a fail_reason"),
        ({"outcome": "PRUNED"}, "PRUNED has neither values"),
        ({"duration_s": "1s"}, "'duration_s' must be a float"),
        ({"duration_s": -1.0}, "'duration_s' must be a float >= 0"),
        ({"error": 3}, "'error' must be a str"),
        ({"worker": None}, "'worker' must be a str"),
        ({"incarnation": ...}, r"missing fields \['incarnation'\]"),
        ({"incarnation": "x"}, "'incarnation' must be an incarnation id"),
    ],
)
def test_result_fields_are_checked(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        TrialResult.decode(wire(a_result(), **changes))


def test_an_int_is_a_valid_float_on_the_wire() -> None:
    decoded = TrialResult.decode(wire(a_result(), values=[3], duration_s=1))
    assert decoded.values == [3.0] and isinstance(decoded.values[0], float)
    assert decoded.duration_s == 1.0


def test_the_version_is_on_the_wire() -> None:
    assert msgpack.unpackb(a_request().encode())["v"] == PROTOCOL_VERSION


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"model": {"layers": {1, 2}}}, "input 'model.layers' is a set"),
        ({"fn": print}, "input 'fn' is a builtin_function_or_method"),
        ({"grid": [1, object()]}, r"input 'grid\[1\]' is a object"),
        ({"model": {3: "x"}}, "input 'model' has the key 3"),
        ({"big": 2**70}, "too large an integer"),
    ],
)
def test_params_msgpack_cannot_carry_are_refused_by_name(
    params: dict[str, Any], message: str
) -> None:
    with pytest.raises(ProtocolError, match=message):
        check_params(params)
    with pytest.raises(ProtocolError, match=message):
        a_request(params=params).encode()


def test_a_result_that_breaks_the_outcome_rules_cannot_be_built() -> None:
    with pytest.raises(ProtocolError, match="FAIL needs a fail_reason"):
        a_result(outcome=Outcome.FAIL, values=None)


def test_trial_calls_and_replies_round_trip_and_are_checked() -> None:
    from optuna_rq.protocol import TrialCall, TrialCallReply

    call = TrialCall(
        study="s",
        incarnation=INCARNATION,
        trial_number=1,
        attempt=1,
        seq=3,
        method="suggest_float",
        args=["x", 0.0, 1.0],
        kwargs={"log": False},
        reply=True,
    )
    assert TrialCall.decode(call.encode()) == call
    reply = TrialCallReply.to(call, ok=True, value=0.5, error=None)
    assert TrialCallReply.decode(reply.encode()) == reply and reply.answers(call)
    with pytest.raises(ProtocolError, match="'reply' must be a bool"):
        TrialCall.decode(wire(call, reply=1))
    with pytest.raises(ProtocolError, match="'args' must be a list"):
        TrialCall.decode(wire(call, args={"x": 1}))
    with pytest.raises(ProtocolError, match="'seq' must be an int >= 1"):
        TrialCallReply.decode(wire(reply, seq=0))
    with pytest.raises(ProtocolError, match="'incarnation' must be an incarnation id"):
        TrialCall.decode(wire(call, incarnation="0123456789a"))
    for name in ("study", "incarnation", "trial_number", "attempt", "seq"):
        with pytest.raises(ProtocolError, match=rf"missing fields \['{name}'\]"):
            TrialCallReply.decode(wire(reply, **{name: ...}))


@pytest.mark.parametrize(
    "changes",
    [
        {"study": "t"},
        {"incarnation": "ba9876543210"},
        {"trial_number": 2},
        {"attempt": 2},
        {"seq": 4},
    ],
)
def test_a_reply_answers_only_the_call_it_names(changes: dict[str, Any]) -> None:
    from optuna_rq.protocol import TrialCall, TrialCallReply

    call = TrialCall(
        study="s",
        incarnation=INCARNATION,
        trial_number=1,
        attempt=1,
        seq=3,
        method="should_prune",
        args=[],
        kwargs={},
        reply=True,
    )
    other = dataclasses.replace(call, **changes)
    assert TrialCallReply.to(call, ok=True, value=None, error=None).answers(call)
    assert not TrialCallReply.to(other, ok=True, value=None, error=None).answers(call)


def test_the_broker_gives_a_spec_its_incarnation_and_keeps_it_until_a_delete() -> None:
    from optuna_rq.protocol import StudySpec

    submitted = StudySpec(
        name="s",
        objective="tests.support.objectives:quadratic",
        space={},
        n_trials=1,
        concurrency=1,
    )
    assert submitted.incarnation is None  # a front door sends none
    stored = submitted.incarnated(None)  # first submitted (or again after a delete)
    assert stored.incarnation is not None and re.fullmatch("[0-9a-f]{12}", stored.incarnation)
    assert StudySpec.decode(stored.encode()) == stored
    again = submitted.with_changes(n_trials=5).incarnated(stored)
    assert again.incarnation == stored.incarnation  # the same study, submitted again
    assert submitted.incarnated(None).incarnation != stored.incarnation  # after a delete
    # Not part of the definition: two incarnations of one definition are the same study.
    assert stored.differences(submitted.incarnated(None)) == []
    assert stored.differences(submitted) == []
    fields = msgpack.unpackb(stored.encode())
    fields["incarnation"] = "s:0:1"
    with pytest.raises(ProtocolError, match="'incarnation' must be an incarnation id"):
        StudySpec.decode(msgpack.packb(fields))


@pytest.mark.parametrize(
    ("field", "value", "limit"),
    [
        ("trial_timeout_s", 1e300, "at most 2592000 seconds"),
        ("trial_timeout_s", 3.2e9, "at most 2592000 seconds"),
        ("n_trials", 2**62, "from 1 to 1000000000"),
        ("concurrency", 10**7, "from 1 to 100000"),
        ("max_retries", 10**6, "from 0 to 100"),
        ("priority", 1e300, "at most 1e+06"),
        ("seed", -5, "0"),
    ],
)
def test_a_spec_on_the_wire_with_a_number_out_of_range_is_refused(
    field: str, value: object, limit: str
) -> None:
    from optuna_rq.protocol import StudySpec

    spec = StudySpec(
        name="s",
        objective="tests.support.objectives:quadratic",
        space={},
        n_trials=1,
        concurrency=1,
    )
    fields = msgpack.unpackb(spec.encode())
    fields[field] = value
    with pytest.raises(ProtocolError, match=re.escape(limit)):
        StudySpec.decode(msgpack.packb(fields))


def test_tpe_lies_constantly_above_cap_1_unless_told() -> None:
    from optuna_rq.protocol import StudySpec

    def spec(**fields: Any) -> StudySpec:
        return StudySpec(
            name="s", objective="tests.support.objectives:quadratic", space={}, n_trials=1, **fields
        )

    assert not spec(concurrency=1).uses_constant_liar  # nothing runs while it asks
    assert spec(concurrency=2).uses_constant_liar
    assert not spec(concurrency=2, constant_liar=False).uses_constant_liar
    assert spec(concurrency=1, constant_liar=True).uses_constant_liar
    assert spec(concurrency=2).ask_ahead == 0  # the sampler sees what study.optimize would
    # Lying or not is part of the study's definition: a resubmission may not flip it.
    assert spec(concurrency=2).differences(spec(concurrency=2, constant_liar=False)) == [
        "constant_liar None, not False"
    ]


def _members_named(*modules: object) -> set[str]:
    """The `TrialMethod.X` members the modules' source names."""
    import ast
    import inspect

    found: set[str] = set()
    for module in modules:
        tree = source_trees.parse(inspect.getsource(module))  # type: ignore[arg-type]
        found.update(
            node.attr
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "TrialMethod"
            and node.attr.isupper()
        )
    return found


def test_both_ends_of_a_trial_call_name_every_method_by_its_member() -> None:
    """The worker calls each `TrialMethod` and the broker has a case for each: a method added
    to the enum without both is caught here, not by an objective on a worker."""
    from optuna_rq.dispatch import calls
    from optuna_rq.protocol import TrialMethod
    from optuna_rq.workers import remote_study, remote_trial

    members = {m.name for m in TrialMethod}
    assert _members_named(calls) == members
    assert _members_named(remote_trial, remote_study) == members
    assert TrialMethod.named("report") is TrialMethod.REPORT
    with pytest.raises(LookupError, match="unknown trial method 'no_such_method'"):
        TrialMethod.named("no_such_method")
