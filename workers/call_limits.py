"""A remote trial's call that the broker would refuse is refused on the worker, before it is sent.

The broker reads a call with `TrialCall.decode` under its message cap (`--max-message-bytes`,
`OPTUNA_RQ_MAX_MESSAGE_BYTES`, 1 MiB by default) and the codec's bounds (`MAX_CONTAINER_LEN`
items in any one list or map, `MAX_DEPTH` levels of nesting): a call over any of them would be
refused there, so `encode_call` checks them here, then decodes the call with that very decoder
under the same cap, and raises at once what the objective can act on, naming the limit: a
`set_user_attr` of a large value or a `suggest_categorical` over many choices fails in the
objective, instead of waiting for an answer that would not come.
"""

from __future__ import annotations

from typing import Any

from optuna_rq.errors import ProtocolError, RemoteTrialError
from optuna_rq.protocol import MAX_CONTAINER_LEN, MAX_DEPTH, TrialCall

__all__ = ["encode_call"]

_FIX = (
    "keep large values out of the trial (store files with optuna.artifacts and keep their id), "
    "or raise --max-message-bytes (OPTUNA_RQ_MAX_MESSAGE_BYTES) on the broker and the workers"
)


def encode_call(call: TrialCall, *, max_bytes: int) -> bytes:
    """`call` encoded, if the broker would take it under the message cap `max_bytes`, which it
    shares. Raises `RemoteTrialError` naming the limit and the fix for a call over one, and
    `TypeError` for a value msgpack cannot carry (as a JSON storage refuses what it cannot
    store)."""
    what = f"trial.{call.method}"
    for where, value in (("args", call.args), ("kwargs", call.kwargs)):
        over = _over_a_limit(value, where, depth=2)  # the call is depth 1, its args depth 2
        if over is not None:
            raise RemoteTrialError(f"{what}: {over}, a limit the broker enforces")
    try:
        payload = call.encode()
    except ProtocolError as exc:
        raise TypeError(f"{what}: {exc}") from None
    if len(payload) > max_bytes:
        raise RemoteTrialError(
            f"{what}: the call is {len(payload):,} bytes, over the {max_bytes:,}-byte message "
            f"limit the broker enforces: {_FIX}"
        )
    try:
        TrialCall.decode(payload, max_bytes=max_bytes)  # whatever else the broker refuses
    except ProtocolError as exc:
        raise RemoteTrialError(f"{what}: the broker would refuse the call: {exc}") from None
    return payload


def _over_a_limit(value: Any, path: str, depth: int) -> str | None:
    """How `value` (at `path`, nested `depth` deep in the call) is over a container limit."""
    if not isinstance(value, (list, tuple, dict)):
        return None
    if depth > MAX_DEPTH:
        return f"{path} nests deeper than the {MAX_DEPTH} levels a message may hold"
    if len(value) > MAX_CONTAINER_LEN:
        return (
            f"{path} holds {len(value):,} items, over the {MAX_CONTAINER_LEN:,} a list or map in "
            "a message may hold (pass fewer: a categorical's choices are one list)"
        )
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        over = _over_a_limit(item, f"{path}[{key!r}]", depth + 1)
        if over is not None:
            return over
    return None
