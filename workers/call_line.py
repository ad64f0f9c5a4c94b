"""One attempt's trial calls to the broker, on a Redis connection of their own.

A call that records (`report`) is written to the result stream at once, and its reply (the
entry's id, or Redis's error) is read later: with the next call that waits, or when the
objective ends (`settle`). So the worker waits for no round trip of its own on a `report`,
and Redis has appended the call before anything the worker sends after it. A call that waits
(`should_prune`) goes out with the wait for its answer, in one round trip: the XADD and the
first BLPOP on the attempt's reply list together.

Everything goes on one connection, so Redis runs it in the order it was sent; the trial's
result goes on another, after `settle` has read every reply: it follows every call of the trial
on the stream. An error Redis answered for a recorded call (it is full, say) is raised by the
next call or by `settle`. A connection lost midway is ridden out as the client's own retries
do, at least once: the calls whose replies were not read are appended again through the client
(which retries), and the wait goes on there.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from optuna_rq.protocol import CALL_FIELD

__all__ = ["CallLine"]

_LOST = (RedisConnectionError, RedisTimeoutError)


class CallLine:
    """Appends one attempt's calls to `stream` and waits for their answers (see the module)."""

    def __init__(self, client: redis.Redis, stream: str) -> None:
        self._client = client
        self._stream = stream
        self._line: Any = None  # a connection of the client's pool, held while the trial runs
        self._unread: list[bytes] = []  # calls written whose replies are not read yet

    def post(self, sealed: bytes) -> None:
        """Append the sealed call to the stream; its reply is read later (see the module)."""
        self._unread.append(sealed)
        try:
            line = self._taken()
            line.send_packed_command(line.pack_commands([self._xadd(sealed)]), check_health=False)
        except _LOST:
            self._lost()
        except BaseException:
            self._drop_line()
            raise

    def call(self, sealed: bytes, reply_key: str, timeout_s: float) -> Any:
        """Append the sealed call and wait up to `timeout_s` for the first reply on `reply_key`:
        (key, reply), or None when none came. Raises what Redis answered to a call before it."""
        fresh = not self._unread
        commands = [self._xadd(sealed), ("BLPOP", reply_key, timeout_s)]
        try:
            line = self._taken()
            line.send_packed_command(line.pack_commands(commands), check_health=fresh)
        except _LOST:
            self._unread.append(sealed)
            self._lost()
            return self._client.blpop([reply_key], timeout=timeout_s)
        except BaseException:
            self._drop_line()
            raise
        self._unread.append(sealed)
        try:
            self._read_unread()
            return _pair(line.read_response())
        except _LOST:
            self._lost()
            return self._client.blpop([reply_key], timeout=timeout_s)
        except BaseException:
            self._drop_line()  # the BLPOP may still wait on Redis: its connection goes with it
            raise

    def settle(self) -> None:
        """Read the replies not read yet (raising what Redis answered to a call), and give the
        connection back: the trial's result may go to the stream now, after its calls."""
        try:
            if self._line is not None:
                self._read_unread()
        except _LOST:
            self._lost()
        except BaseException:
            self._drop_line()
            raise
        finally:
            self._give_back()

    def _xadd(self, sealed: bytes) -> tuple[Any, ...]:
        return ("XADD", self._stream, "*", CALL_FIELD, sealed)

    def _taken(self) -> Any:
        if self._line is None:
            self._line = self._client.connection_pool.get_connection()
        return self._line

    def _read_unread(self) -> None:
        """Read the replies of the calls written, oldest first; raise the first error among
        them, once all are read (the connection stays in step)."""
        error: redis.ResponseError | None = None
        while self._unread:
            try:
                self._line.read_response()
            except redis.ResponseError as exc:
                error = error or exc
            self._unread.pop(0)
        if error is not None:
            raise error

    def _lost(self) -> None:
        """The connection was lost with calls not known to be in Redis: append them again
        through the client, which retries (at least once, as its own retries are)."""
        unread, self._unread = self._unread, []
        self._drop_line()
        for sealed in unread:
            self._client.xadd(self._stream, {CALL_FIELD: sealed})

    def _drop_line(self) -> None:
        if self._line is not None:
            self._line.disconnect()
        self._give_back()

    def _give_back(self) -> None:
        if self._line is not None:
            self._client.connection_pool.release(self._line)
            self._line = None
        self._unread = []


def _pair(popped: Any) -> Any:
    """BLPOP's raw reply as the client gives it: (key, value), or None."""
    return None if popped is None else tuple(popped)
