"""Fenced writes: the broker writes to Redis only while it holds its lock and the epoch it started
with, checked atomically with every write.

`FencedRedis` is the broker's one client: the daemon's, the dispatcher's, the status publisher's,
and RQ's, whose queues and jobs are made from it. Every write command it sends, and every
pipeline or transaction that holds one, runs inside one Lua script (`FENCE_SCRIPT`): the script
checks that `<prefix>:epoch` still holds the broker's epoch and `<prefix>:broker` still names
the broker, and only then runs the commands, in order (`redis.pcall` on each), and returns their
replies, to which redis-py's own response callbacks apply as if each had run alone. A failed check
writes nothing and raises `RedisDataLostError` (the epoch is gone: Redis restarted empty, was
flushed, or failed over to an empty replica) or `FenceLostError` (another broker holds the lock:
this one was frozen, or cut off, past the lock's TTL). A script runs whole on the server with
nothing in between, so nothing slips between the check and the writes, and a transaction keeps
its all-or-nothing meaning.

What writes is Redis's to say: the `write` flag of COMMAND INFO, asked once per command name
(`write_commands.CommandTable`, shared by a client and its pipelines). Reads go straight
through. Three cases need more:

- XREADGROUP writes (it moves entries into the group's pending list) and may block, which a
  script cannot. A blocking one runs fenced without BLOCK; if it got nothing, the client waits
  with XREAD BLOCK (a read) for an entry after the stream's last one (read by the same script),
  then reads fenced again. A stale broker therefore never takes a result off the stream: what it
  cannot read stays new for the broker that took over.
- A lock that lapsed while no other broker took it (an outage longer than its TTL) is taken again
  by the script itself: the generation key, incremented by every acquisition, proves that nobody
  held it in between. A lock another broker took is never taken back.
- A script (EVAL, FCALL) cannot run inside a script, a command flagged `noscript` cannot either,
  and a blocking write would stop blocking there: these are refused (`FenceError`), never sent
  unfenced.

A script that passes proves the lock and the epoch: in a turn of the broker's loop (`proving`),
the check before something is made durable in a study storage (`check_fence`) takes a proof made
earlier in the turn, unless the broker waited on Redis since (a blocking read), instead of a round
trip of its own. Writes are fenced each time, whatever was proven.

Lua hands replies back whole under RESP2 (a nil stays nil, an error stays its command's error),
so the client speaks RESP2. Lua's `unpack` stops near 8,000 values: a longer command is split
into parts in the same script if its items are independent (`_SPLITTABLE`), else refused.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
from redis.client import EMPTY_RESPONSE, NEVER_DECODE, Pipeline
from redis.exceptions import NoScriptError, ResponseError, WatchError

from optuna_rq.daemon.write_commands import CommandKind, CommandTable, text, words_of
from optuna_rq.errors import FenceError, FenceLostError, RedisDataLostError
from optuna_rq.plumbing.connection import derived_pool

__all__ = [
    "ACQUIRE_SCRIPT",
    "FENCE_SCRIPT",
    "FENCE_SHA",
    "Fence",
    "FencedPipeline",
    "FencedRedis",
    "data_lost_error",
]

log = logging.getLogger("optuna_rq.broker")

# KEYS: the lock, the epoch, the generation. ARGV: the broker's token, its epoch, its generation,
# the lock's TTL in ms, then each command as its length and its words.
# The shebang makes it a flagged script: Redis refuses it whole, before it runs, while it is out
# of memory (no `allow-oom`), as it refuses a whole MULTI/EXEC; unflagged, it would run each
# command that frees or keeps (LTRIM, XACK, PEXPIRE) and refuse only those that grow, so a take
# off one list onto another could trim without pushing.
FENCE_SCRIPT = """#!lua
if redis.call('get', KEYS[2]) ~= ARGV[2] then
  return redis.error_reply('FENCED epoch')
end
local retaken = 0
local holder = redis.call('get', KEYS[1])
if holder ~= ARGV[1] then
  if holder or redis.call('get', KEYS[3]) ~= ARGV[3] then
    return redis.error_reply('FENCED lock')
  end
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[4])
  retaken = 1
end
local replies = {retaken}
local i = 5
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  replies[#replies + 1] = redis.pcall(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return replies
"""
FENCE_SHA = hashlib.sha1(FENCE_SCRIPT.encode()).hexdigest()

# KEYS: the lock, the epoch, the generation. ARGV: the token, the TTL in ms, a new epoch (kept
# only if there is none), the identity of a dead broker whose lock to take over ('' for none),
# the time in ms. The generation counts acquisitions; where Redis has none (new, or its data
# lost) it starts from the time, so that it still only grows: SQL storages keep the broker's
# fence by it (`storage.sql_fence`).
ACQUIRE_SCRIPT = """
local holder = redis.call('get', KEYS[1])
if holder and holder == ARGV[4] then
  redis.call('del', KEYS[1])
  holder = false
end
if holder then
  return {0, holder}
end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('set', KEYS[2], ARGV[3], 'NX')
redis.call('set', KEYS[3], ARGV[5], 'NX')
return {1, redis.call('get', KEYS[2]), tostring(redis.call('incr', KEYS[3]))}
"""

# redis-py's own methods, typed for mypy (they are not).
_execute: Callable[..., Any] = redis.Redis.execute_command
_immediate: Callable[..., Any] = Pipeline.immediate_execute_command
_in_transaction: Callable[..., Any] = Pipeline._execute_transaction
_in_pipeline: Callable[..., Any] = Pipeline._execute_pipeline
_raise_first_error: Callable[..., Any] = Pipeline.raise_first_error

MAX_ARGS = 7000
"""The longest command sent as one: Lua's `unpack` fails near 8,000 values."""
_SPLITTABLE = {"XACK": 3, "XDEL": 2, "DEL": 1, "UNLINK": 1, "HDEL": 2, "SREM": 2, "ZREM": 2}
"""Commands whose words after the first N are independent items and whose reply counts what
they did: a longer one runs as several, in the same script, its replies summed."""


def data_lost_error(epoch_key: str, current: object) -> RedisDataLostError:
    return RedisDataLostError(
        f"Redis lost its data: the key {epoch_key!r} the broker set at start is "
        f"{'gone' if current is None else 'different'}. The server restarted without "
        "persistence, was flushed, or failed over to an empty replica. The broker stops "
        "rather than write on: submitted studies, queued trials and unread results are "
        "gone from Redis (trials told so far are safe in their storages). Turn on "
        "persistence (appendonly yes), then start the broker again and resubmit."
    )


@dataclass
class Fence:
    """What every write is conditional on: the lock at `lock` holds `token`, the epoch at
    `epoch_key` is `epoch`; `generation` (at `generation_key`) is the acquisition that took the
    lock. Armed once the lock is taken (`epoch` and `generation` set)."""

    lock: str
    epoch_key: str
    generation_key: str
    token: bytes
    ttl_ms: int
    epoch: bytes | None = None
    generation: bytes | None = None

    def script_args(self, commands: Sequence[Sequence[Any]]) -> tuple[list[Any], list[int]]:
        """The fence script's arguments (after its SHA) for `commands`, and how many of its
        replies each command takes (a split command several)."""
        if self.epoch is None or self.generation is None:
            raise FenceError("the broker wrote to Redis before it took its lock")
        args: list[Any] = [3, self.lock, self.epoch_key, self.generation_key]
        args += [self.token, self.epoch, self.generation, self.ttl_ms]
        shape = []
        for command in commands:
            parts = _parts(words_of(command))
            shape.append(len(parts))
            for part in parts:
                args.append(len(part))
                args += part
        return args, shape

    def replies(self, raw: list[Any], shape: list[int]) -> list[Any]:
        """Each command's reply, from the fence script's `raw` replies."""
        if raw[0] == 1:
            log.warning(
                "took the broker lock again: it lapsed (Redis was out of reach longer than its "
                "TTL) and no other broker held it meanwhile"
            )
        replies, at = [], 1
        for count in shape:
            parts = raw[at : at + count]
            at += count
            errors = [r for r in parts if isinstance(r, ResponseError)]
            replies.append(parts[0] if count == 1 else errors[0] if errors else sum(parts))
        return replies

    def refused(self, error: ResponseError, read: Callable[[str], object]) -> Exception:
        """The error to raise for the fence script's `error`: the fence's refusal, naming what
        Redis holds now (read with `read`), or the server's own error as it is."""
        message = str(error)
        if not message.startswith(("FENCED epoch", "FENCED lock")):
            return error
        try:
            epoch, holder = read(self.epoch_key), read(self.lock)
        except redis.RedisError:
            epoch, holder = b"?", None
        if message.startswith("FENCED epoch"):
            return data_lost_error(self.epoch_key, epoch)
        name = (
            f"{holder.decode(errors='replace')} holds it now"
            if isinstance(holder, bytes)
            else "another broker took it meanwhile"
        )
        return FenceLostError(
            f"lost the broker lock: {name}. This broker was frozen or cut off "
            f"from Redis longer than the lock's TTL ({self.ttl_ms / 1000:g}s) and stops "
            "without writing anything more; the broker holding the lock serves its studies"
        )


class FencedRedis(redis.Redis):
    """A redis-py client whose every write is conditional on `fence` (see the module)."""

    def __init__(self, *, connection_pool: redis.ConnectionPool, fence: Fence) -> None:
        super().__init__(connection_pool=connection_pool)
        self.fence = fence
        self.table = CommandTable()
        self.in_turn = False  # within one turn of the broker's loop: proofs are kept (`proving`)
        self.proven = False  # a fence script passed in this turn, with no wait on Redis since

    @classmethod
    def around(cls, connection: redis.Redis, fence: Fence) -> FencedRedis:
        """A fenced client of the server `connection` talks to, with its settings (address,
        credentials, TLS, retries, timeouts), speaking RESP2."""
        return cls(connection_pool=derived_pool(connection, protocol=2), fence=fence)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> FencedPipeline:
        return FencedPipeline(self, transaction, shard_hint)

    def execute_command(self, *args: Any, **options: Any) -> Any:
        kind = self.table.kind(self, args)
        if kind is CommandKind.READ:
            return _execute(self, *args, **options)
        if kind is CommandKind.READ_GROUP and _block_at(args) is not None:
            return self._read_group(args, options)
        return _raised(_parsed(self.response_callbacks, args, options, self.run_fenced([args])[0]))

    def check_fence(self) -> None:
        """Raise unless this broker still holds its lock and its epoch: one round trip, unless a
        fence script proved both earlier in this turn (`proving`)."""
        if not self.proven:
            self.run_fenced([])

    @contextmanager
    def proving(self) -> Iterator[None]:
        """One turn of the broker's loop: a proof of the fence made in it stands for the checks
        after it, until a wait on Redis or the turn's end."""
        self.in_turn, self.proven = True, False
        try:
            yield
        finally:
            self.in_turn = self.proven = False

    def run_fenced(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Run `commands` in the fence script; their raw replies (an error reply in its place)."""
        args, shape = self.fence.script_args(commands)
        try:
            try:
                raw = _execute(self, "EVALSHA", FENCE_SHA, *args)
            except NoScriptError:  # a restarted server forgot it
                _execute(self, "SCRIPT LOAD", FENCE_SCRIPT)
                raw = _execute(self, "EVALSHA", FENCE_SHA, *args)
        except ResponseError as exc:
            self.proven = False
            raise self.fence.refused(exc, self.read) from None
        self.proven = self.in_turn
        return self.fence.replies(raw, shape)

    def acquire(self, *, epoch: str, take_over: str | None = None) -> bytes | None:
        """Take the lock (and set the epoch if Redis has none), arming the fence; or, if another
        broker holds it, its identity. `take_over`: the identity of a broker whose lock may be
        taken (one that died)."""
        fence = self.fence
        reply = _execute(
            self,
            "EVAL",
            ACQUIRE_SCRIPT,
            3,
            *(fence.lock, fence.epoch_key, fence.generation_key),
            *(fence.token, fence.ttl_ms, epoch, take_over or "", time.time_ns() // 1_000_000),
        )
        if reply[0] != 1:
            return bytes(reply[1])
        fence.epoch, fence.generation = bytes(reply[1]), bytes(reply[2])
        return None

    def read(self, key: str) -> object:
        """GET `key`, unfenced (a read)."""
        return _execute(self, "GET", key)

    def _read_group(self, args: Sequence[Any], options: Mapping[str, Any]) -> Any:
        """A blocking XREADGROUP, fenced: see the module."""
        at = _block_at(args)
        assert at is not None
        block_ms = args[at + 1]
        plain = [*args[:at], *args[at + 2 :]]
        streams_at = [text(word).upper() for word in plain].index("STREAMS")
        names = plain[streams_at + 1 :]
        keys, ids = names[: len(names) // 2], names[len(names) // 2 :]
        waiting = [key for key, entry_id in zip(keys, ids, strict=True) if text(entry_id) == ">"]
        last = [("XREVRANGE", key, "+", "-", "COUNT", 1) for key in waiting]
        replies = self.run_fenced([plain, *last])
        if waiting and replies[0] is None and not any(_is_error(r) for r in replies):
            after = [r[0][0] if r else b"0-0" for r in replies[1:]]
            self.proven = False  # what holds after the wait is for the next script to prove
            woke = _execute(
                self, "XREAD", "COUNT", 1, "BLOCK", block_ms, "STREAMS", *waiting, *after
            )
            if woke:
                replies = self.run_fenced([plain])
        return _raised(_parsed(self.response_callbacks, args, options, replies[0]))


class FencedPipeline(Pipeline):
    """A pipeline of a `FencedRedis`: one holding a write runs whole in the fence script
    (inside MULTI/EXEC only if it WATCHes keys, which the script cannot)."""

    def __init__(self, client: FencedRedis, transaction: bool, shard_hint: Any) -> None:
        super().__init__(client.connection_pool, client.response_callbacks, transaction, shard_hint)
        self.fenced = client

    def immediate_execute_command(self, *args: Any, **options: Any) -> Any:
        if self.fenced.table.kind(self.fenced, args) is not CommandKind.READ:
            raise FenceError(f"{text(args[0])}: a write between WATCH and MULTI cannot be fenced")
        return _immediate(self, *args, **options)

    def _execute_transaction(self, connection: Any, commands: Any, raise_on_error: bool) -> Any:
        if not self._writes(commands):
            return _in_transaction(self, connection, commands, raise_on_error)
        return self._execute_fenced(connection, commands, raise_on_error)

    def _execute_pipeline(self, connection: Any, commands: Any, raise_on_error: bool) -> Any:
        if not self._writes(commands):
            return _in_pipeline(self, connection, commands, raise_on_error)
        return self._execute_fenced(connection, commands, raise_on_error)

    def _writes(self, commands: Sequence[tuple[Sequence[Any], Any]]) -> bool:
        table, client = self.fenced.table, self.fenced
        return any(table.kind(client, args) is not CommandKind.READ for args, _options in commands)

    def _execute_fenced(self, connection: Any, commands: Any, raise_on_error: bool) -> list[Any]:
        fence = self.fenced.fence
        args, shape = fence.script_args([command for command, _options in commands])
        script: list[tuple[tuple[Any, ...], dict[str, Any]]] = [(("EVALSHA", FENCE_SHA, *args), {})]
        # The script is atomic: MULTI/EXEC only keeps a WATCH's meaning.
        run = _in_transaction if self.watching else _in_pipeline
        [raw] = run(self, connection, script, False)
        if isinstance(raw, NoScriptError):  # a restarted server forgot it
            connection.send_command("SCRIPT", "LOAD", FENCE_SCRIPT)
            connection.read_response()
            if self.watching:
                raise WatchError("the fence script was loaded again: run the transaction again")
            [raw] = run(self, connection, script, False)
        self.fenced.proven = self.fenced.in_turn and not isinstance(raw, ResponseError)
        if isinstance(raw, ResponseError):
            raise fence.refused(raw, self.fenced.read)
        replies = fence.replies(raw, shape)
        if raise_on_error:
            _raise_first_error(self, commands, replies)
        return [
            _parsed(self.response_callbacks, command, options, reply)
            for reply, (command, options) in zip(replies, commands, strict=True)
        ]


def _parts(words: list[Any]) -> list[list[Any]]:
    if len(words) <= MAX_ARGS:
        return [words]
    name = text(words[0]).upper()
    fixed = _SPLITTABLE.get(name)
    if fixed is None:
        raise FenceError(f"{name} with {len(words)} arguments is too long to run fenced")
    head, items, step = words[:fixed], words[fixed:], MAX_ARGS - fixed
    return [head + items[i : i + step] for i in range(0, len(items), step)]


def _block_at(args: Sequence[Any]) -> int | None:
    """Where BLOCK stands in an XREADGROUP (after GROUP group consumer, before STREAMS)."""
    for i in range(4, len(args)):
        word = text(args[i]).upper()
        if word == "STREAMS":
            return None
        if word == "BLOCK":
            return i
    return None


def _is_error(reply: Any) -> bool:
    return isinstance(reply, ResponseError)


def _parsed(callbacks: Mapping[str, Any], args: Sequence[Any], options: Any, reply: Any) -> Any:
    """`reply` as redis-py returns it for the command `args` (as `Redis.parse_response` does)."""
    if isinstance(reply, ResponseError):
        return options.get(EMPTY_RESPONSE, reply)
    kept = {k: v for k, v in options.items() if k not in (EMPTY_RESPONSE, NEVER_DECODE, "keys")}
    callback = callbacks.get(args[0])
    return reply if callback is None else callback(reply, **kept)


def _raised(reply: Any) -> Any:
    if isinstance(reply, ResponseError):
        raise reply
    return reply
