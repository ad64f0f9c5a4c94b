"""The RQ queue trials travel on: its msgpack serializer, so no pickle ever crosses Redis, and
the one job function it carries.

RQ passes job data, meta and results through one serializer. Ours carries only what msgpack
carries (None, bool, int, float, str, bytes, lists, str-keyed maps), refuses ext types, and
caps the size before it decodes anything: a forged or corrupted job fails to load, it never
runs code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgpack

if TYPE_CHECKING:
    from rq import Queue

__all__ = ["MAX_JOB_BYTES", "RUN_TRIAL", "MsgpackSerializer", "trial_queue"]

RUN_TRIAL = "optuna_rq.workers.runner.run_trial"
"""The only RQ job function a worker runs (checked by name before anything is imported). Its
path is part of the wire: moving it is a protocol version change."""

MAX_JOB_BYTES = 4 * 1024 * 1024
"""RQ job data holds one trial request (itself capped) plus RQ's own framing."""


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not allowed in RQ data")


class MsgpackSerializer:
    """`rq.serializers.Serializer` on msgpack: pass it to every Queue, Job and Worker we make."""

    @staticmethod
    def dumps(obj: Any, /) -> bytes:
        packed: bytes = msgpack.packb(obj, use_bin_type=True)
        return packed

    @staticmethod
    def loads(data: bytes, /) -> Any:
        if len(data) > MAX_JOB_BYTES:
            raise ValueError(f"RQ data is {len(data)} bytes, over the {MAX_JOB_BYTES}-byte cap")
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_refuse_ext,
        )


def trial_queue(connection: Any, name: str) -> Queue:
    """The RQ queue trials travel on, with our serializer: the one way both sides make it."""
    from rq import Queue  # RQ (and Redis with it) for the sides that enqueue or run trials

    return Queue(name, connection=connection, serializer=MsgpackSerializer)
