"""A remote trial's call that the broker would refuse is refused on the worker, before it is sent.

The broker reads a call with `TrialCall.decode` under its message cap (`--max-message-bytes`,
`OPTUNA_RQ_MAX_MESSAGE_BYTES`, 1 MiB by default) and the codec's bounds (`MAX_CONTAINER_LEN`
items in any one list or map, `MAX_DEPTH` levels of nesting): a call over any of them would be
refused there, so `check_call` decodes it here with that very decoder, under the same limits,
and raises at once what the objective can act on, naming the limit: a `set_user_attr` of a
large value or a `suggest_categorical` over many choices fails in the objective, instead of
waiting for an answer that would not come.
"""

from __future__ import annotations

from typing import Any

from optuna_rq.errors import ProtocolError, RemoteTrialError
from optuna_rq.protocol import MAX_CONTAINER_LEN, TrialCall

__all__ = ["check_call"]

_FIX = (
    "keep large values out of the trial (store files with optuna.artifacts and keep their id), "
    "or raise --max-message-bytes (OPTUNA_RQ_MAX_MESSAGE_BYTES) on the broker and the workers"
)


def check_call(call: TrialCall, payload: bytes, *, max_bytes: int) -> None:
    """Raise `RemoteTrialError`, naming the limit and the fix, if the broker would refuse
    `call` (encoded as `payload`) under the message cap `max_bytes`, which it shares."""
    what = f"trial.{call.method}"
    if len(payload) > max_bytes:
        raise RemoteTrialError(
            f"{what}: the call is {len(payload):,} bytes, over the {max_bytes:,}-byte message "
            f"limit the broker enforces: {_FIX}"
        )
    for where, value in (("args", call.args), ("kwargs", call.kwargs)):
        long = _too_long(value, where)
        if long is not None:
            path, length = long
            raise RemoteTrialError(
                f"{what}: {path} holds {length:,} items, over the {MAX_CONTAINER_LEN:,} a list "
                "or map in a message may hold, a limit the broker enforces: pass fewer (a "
                "categorical's choices are one list)"
            )
    try:
        TrialCall.decode(payload, max_bytes=max_bytes)  # whatever else the broker refuses
    except ProtocolError as exc:
        raise RemoteTrialError(f"{what}: the broker would refuse the call: {exc}") from None


def _too_long(value: Any, path: str) -> tuple[str, int] | None:
    """The first list or map in `value` over `MAX_CONTAINER_LEN` items: its path and length."""
    if isinstance(value, (list, tuple, dict)):
        if len(value) > MAX_CONTAINER_LEN:
            return path, len(value)
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for key, item in items:
            found = _too_long(item, f"{path}[{key!r}]")
            if found is not None:
                return found
    return None
