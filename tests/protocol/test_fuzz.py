"""Property tests: any bytes either decode to a valid message or raise ProtocolError."""

from __future__ import annotations

import os

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optuna_rq.protocol import ProtocolError, TrialCall, TrialCallReply, TrialRequest, TrialResult
from optuna_rq.protocol.queue import MsgpackSerializer
from optuna_rq.protocol.signing import Record, Signer
from optuna_rq.protocol.spec import StudySpec

# 400 examples each keep the whole suite near ten minutes on 2 cores (the fault tests need the
# time; the wrong-shapes test alone took 74 s at 1500). More with OPTUNA_RQ_FUZZ_EXAMPLES=5000;
# long fuzzing runs are tests/fuzz/atheris_protocol.py's job.
MANY = settings(
    max_examples=int(os.environ.get("OPTUNA_RQ_FUZZ_EXAMPLES", "400")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=30)
    | st.binary(max_size=30),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(
            st.text(max_size=12) | st.integers() | st.binary(max_size=4), children, max_size=5
        )
    ),
    max_leaves=25,
)

FIELDS = [
    "v",
    "study",
    "trial_number",
    "attempt",
    "objective",
    "params",
    "n_objectives",
    "reply_to",
    "outcome",
    "values",
    "fail_reason",
    "error",
    "worker",
    "duration_s",
]


def _decoders() -> list:
    return [
        TrialRequest.decode,
        TrialResult.decode,
        TrialCall.decode,
        TrialCallReply.decode,
        StudySpec.decode,
        lambda raw: Signer(b"k" * 32).open(Record.COMMAND, raw),
        # What the broker reads of a call it refuses, to answer it (`dispatch.calls`).
        lambda raw: TrialCall.peek(raw, ("study", "incarnation", "trial_number", "token")),
        lambda raw: Signer(b"k" * 32).open_over_the_cap(Record.CALL, raw),
    ]


def _only_protocol_errors(raw: bytes) -> None:
    for decode in _decoders():
        try:
            decode(raw)
        except ProtocolError:
            pass


@MANY
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_protocol_errors(raw: bytes) -> None:
    _only_protocol_errors(raw)


@MANY
@given(msgpack_values)
def test_arbitrary_msgpack_values_raise_only_protocol_errors(value: object) -> None:
    try:
        raw = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return
    _only_protocol_errors(raw)


@MANY
@given(st.dictionaries(st.sampled_from(FIELDS), msgpack_values, max_size=len(FIELDS)))
def test_wrong_shapes_with_real_field_names_are_refused_or_valid(fields: dict) -> None:
    try:
        raw = msgpack.packb(fields, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return
    for decode in (TrialRequest.decode, TrialResult.decode):
        try:
            message = decode(raw)
        except ProtocolError:
            continue
        assert decode(message.encode()) == message  # anything accepted round-trips


@MANY
@given(st.binary(max_size=300))
def test_the_rq_serializer_raises_only_value_errors(raw: bytes) -> None:
    """RQ wraps any serializer error in DeserializationError; nothing else may escape."""
    try:
        MsgpackSerializer.loads(raw)
    except (ValueError, TypeError):
        pass
