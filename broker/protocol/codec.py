"""The wire format's codec: msgpack maps, packed and unpacked under bounds.

Every message is a msgpack map of field name to value, with a protocol version `v`. Decoding
checks the size before unpacking, refuses ext types and non-str keys, and bounds nesting depth
and container lengths; every failure is one `ProtocolError` that names what was wrong. Nothing
here can run code: there is no pickle, and no hook that builds objects from the data. What a
message's fields must hold is its schema's business (`schema`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeAlias

import msgpack

from optuna_rq.errors import MessageLimitError, ProtocolError

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_CONTAINER_LEN",
    "MAX_DEPTH",
    "PROTOCOL_VERSION",
    "Param",
    "check_params",
    "check_size",
    "check_structure",
    "decode_map",
    "pack",
    "peek_map",
]

PROTOCOL_VERSION = 7
"""2: the package is `optuna_rq` (the job function moved to `optuna_rq.workers.runner`); with
it, unreleased in between: trial queues per module and resource class (`Keys.trial_queue`), the
pools' `PoolHeartbeat`, the `Enqueue` and `Delete` commands.
3: a `StudySpec` carries `ask_ahead` and `constant_liar`; a command comes with an empty
`WAKE_FIELD` entry on the broker's result stream (a broker of version 2 refuses it, counted).
4: names of one incarnation. A stored `StudySpec` carries its `incarnation` (a random id the
broker gives it when it stores it, kept while the study runs); `TrialRequest`, `TrialResult`
and `TrialCall` carry it too, and a `TrialCallReply` names the call it answers (study,
incarnation, trial number, attempt, seq). Job ids, leases, cancel marks and reply lists are
named from the attempt's `AttemptId` (`Keys`): reply lists are `<reply_to>:call:<job id>`, no
longer `<reply_to>:call:<trial>:<attempt>`.
5: Redis is not trusted beyond what a key proves. A sealed record names its kind, the role that
signed it and the name it is stored under (`signing.Record`; Ed25519 with a key per role, or
HMAC with one shared secret); the broker seals the specs it keeps, the status it publishes and
its cancel marks. Every command carries an `id` and `sent_at` (applied once); a `TrialRequest`
carries its attempt's `token`, and the `TrialResult` and `TrialCall` answering it give it back.
A command wakes the broker on `<prefix>:wake`, not on the result stream, and a front door
writes no status (a study not taken yet shows `queued` from its submission).
6: what the front doors read comes through Redis from the broker. The broker publishes each
trial's `TrialSummary` (`Record.TRIAL`, `<prefix>:trials:<study>`) and a `BulkReceipt` for each
bulk command (`Record.RECEIPT`, `<prefix>:receipt:<command id>`); a remote Optimizer publishes
its study's status and trials on keys of its own (`Record.DRIVEN_STATUS`, `Record.DRIVEN_TRIAL`,
`Keys.driven`). `StudyStatus` carries `stopped` (why a stop condition ended the study) apart
from `error`, and a driven study's `driver` and `turn_at_s`; a `StudySpec`'s sampler, pruner
and directions are decoded strictly as their enums (the same strings); `TrialResult` has the
fail reason `bad_signature`; the study view a remote trial reads carries `metric_names`,
`sampler` and `pruner`, and `relative_search_space` is a trial call.
7: a job may carry several trials (`StudySpec.batch`, shown in `StudyStatus.batch`): its
arguments are one sealed `TrialRequest` each, run in order, and its id names every attempt it
carries (`Keys.batch_job_id`). A `TrialRequest` may carry its trial's `relative` search space and
params, and a worker that answers a suggestion from them records it with the trial call
`suggested`."""
# The limits of a message, defined here once: the decoder enforces them (`decode_map`), and the
# front doors check what they send against the same ones (`check_structure`, `check_size`), so
# that a message over one is refused where it is made, naming the limit, not dropped later.
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
"""The message cap: bytes of one encoded message (every role's `--max-message-bytes`)."""
MAX_DEPTH = 32
"""Nesting depth of maps and arrays in a message (the message itself is depth 1)."""
MAX_CONTAINER_LEN = 10_000
"""Entries in any one map or array."""

Param: TypeAlias = "None | bool | int | float | str | bytes | list[Param] | dict[str, Param]"


# -- encoding ------------------------------------------------------------------------------------

_SCALARS = (type(None), bool, int, float, str, bytes)
_CARRIES = "use a list, str, int, float, bool, None or a dict of them"


def check_params(params: Mapping[str, object], root: str = "") -> None:
    """Refuse, naming its dotted path, any value msgpack cannot carry to a worker, and any list or
    map over the limits of a message (`MAX_CONTAINER_LEN` entries, `MAX_DEPTH` levels).

    Tuples pass (they arrive as lists); sets, objects, arrays and non-str keys do not.
    """
    _check_value(params, root, depth=1, where=_input)


def check_structure(message: Mapping[str, object], *, what: str) -> None:
    """Refuse, naming the part (`what.field.key[index]`), what the decoder on the other side
    refuses in the shape of a message (`decode_map`): a list or map of more than
    `MAX_CONTAINER_LEN` entries, nesting deeper than `MAX_DEPTH`, a key that is not str."""
    _check_value(message, what, depth=1, where=_part)


def check_size(raw: bytes, *, what: str, max_bytes: int) -> None:
    """Refuse an encoded message the decoder on the other side refuses for its size."""
    if len(raw) > max_bytes:
        raise MessageLimitError(
            f"{what} is {len(raw):,} bytes encoded, over the {max_bytes:,}-byte message cap"
        )


def _input(path: str) -> str:
    return f"input {path!r}" if path else "the inputs"


def _part(path: str) -> str:
    return path


def _check_value(value: object, path: str, depth: int, where: Callable[[str], str]) -> None:
    if depth > MAX_DEPTH:
        raise MessageLimitError(
            f"{where(path)} nests deeper than {MAX_DEPTH} levels, the most a message may"
        )
    if isinstance(value, _SCALARS):
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
            raise ProtocolError(f"{where(path)} is {value}, too large an integer for msgpack")
        return
    if isinstance(value, (list, tuple, dict)) and len(value) > MAX_CONTAINER_LEN:
        kind = "map" if isinstance(value, dict) else "list"
        raise MessageLimitError(
            f"{where(path)} is a {kind} of {len(value):,} entries, over the {MAX_CONTAINER_LEN:,} "
            "a list or map in a message may hold"
        )
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_value(item, f"{path}[{index}]", depth + 1, where)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProtocolError(
                    f"{where(path)} has the key {key!r} ({type(key).__name__}): keys must be str"
                )
            _check_value(item, f"{path}.{key}" if path else key, depth + 1, where)
        return
    raise ProtocolError(
        f"{where(path)} is a {type(value).__name__}, which cannot be sent to workers: {_CARRIES}"
    )


def pack(message: Mapping[str, object]) -> bytes:
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


# -- decoding ------------------------------------------------------------------------------------


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack ext type {code} is not allowed")


def decode_map(
    raw: bytes, *, what: str, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> dict[str, Any]:
    """Unpack `raw` into a str-keyed map under every bound, or raise ProtocolError."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{what} must be bytes, got {type(raw).__name__}")
    size = len(raw)
    if size > max_bytes:
        raise ProtocolError(
            f"{what} is {size} bytes, over the {max_bytes}-byte cap (raise it with max_bytes)"
        )
    try:
        value = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=MAX_CONTAINER_LEN,
            max_map_len=MAX_CONTAINER_LEN,
        )
    except ProtocolError:
        raise
    except msgpack.ExtraData as exc:
        raise ProtocolError(f"{what} has {len(exc.extra)} bytes after the message") from exc
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # msgpack's format, size and key errors are ValueErrors; a truncated buffer too.
        raise ProtocolError(f"{what} is not valid msgpack ({size} bytes): {exc}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a msgpack map, got {type(value).__name__}")
    _check_value(value, what, depth=1, where=_part)  # str keys and depth, as sent
    return value


_PEEKED_CHARS = 1024  # a name or a token, never a payload


def peek_map(
    raw: bytes, names: Collection[str], *, what: str, max_bin_len: int = _PEEKED_CHARS
) -> dict[str, Any]:
    """The top-level entries `names` of the msgpack map `raw`, each a scalar; every other entry
    is skipped, never built. For a message refused whole (over the size cap, or with a field
    its schema refuses): what it names, so that its sender can be told why. It is no decode:
    nothing read here is a message, and a caller believes it only as far as a seal or a token
    vouches. Bounded: only short scalars are built (bytes up to `max_bin_len`: a sealed body),
    and skipping allocates nothing."""
    if not isinstance(raw, (bytes, bytearray)) or not raw:
        raise ProtocolError(f"{what}: nothing to read")
    unpacker = msgpack.Unpacker(
        raw=False,
        strict_map_key=True,
        ext_hook=_refuse_ext,
        max_buffer_size=len(raw),
        max_str_len=_PEEKED_CHARS,
        max_bin_len=max_bin_len,
        max_array_len=0,  # a wanted entry is a scalar: a container there is refused unread
        max_map_len=MAX_CONTAINER_LEN,  # for the header; a map value is a container, skipped
    )
    unpacker.feed(raw)
    found: dict[str, Any] = {}
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key in names and key not in found and isinstance(key, str):
                found[key] = unpacker.unpack()
                if isinstance(found[key], dict):
                    raise ProtocolError(f"{what}: its {key!r} is a map")
                if len(found) == len(names):
                    break
            else:
                unpacker.skip()
    except ProtocolError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"{what}: cannot read its {sorted(names)}: {exc}") from exc
    return found
