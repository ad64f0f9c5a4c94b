"""Coverage-guided fuzzing of every decoder that reads bytes from Redis, for long runs.

    uv run --with atheris python tests/fuzz/atheris_protocol.py -max_total_time=600

Any exception other than `ProtocolError` (or ValueError from the RQ serializer, which RQ wraps)
is a bug: atheris stops and writes the input that caused it to ./crash-*. The quick version of
this runs in CI as Hypothesis properties (tests/protocol/test_fuzz.py).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from optuna_rq.protocol import (
        ProtocolError,
        TrialCall,
        TrialCallReply,
        TrialRequest,
        TrialResult,
    )
    from optuna_rq.protocol.queue import MsgpackSerializer
    from optuna_rq.protocol.signing import Record, Signer
    from optuna_rq.protocol.spec import StudySpec

_SIGNER = Signer(b"k" * 32)


def one_input(data: bytes) -> None:
    for decode in (
        TrialRequest.decode,
        TrialResult.decode,
        TrialCall.decode,
        TrialCallReply.decode,
        StudySpec.decode,
        lambda raw: _SIGNER.open(Record.COMMAND, raw),
    ):
        try:
            decode(data)
        except ProtocolError:
            pass
    try:
        MsgpackSerializer.loads(data)
    except (ValueError, TypeError):
        pass


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
