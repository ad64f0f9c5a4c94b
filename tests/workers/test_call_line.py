"""A trial's calls on a connection of their own: recorded calls written at once and in order,
their replies read later; a call and the first wait for its answer in one round trip."""

from __future__ import annotations

import threading

import pytest
import redis

from optuna_rq.protocol import CALL_FIELD
from optuna_rq.workers.call_line import CallLine

pytestmark = pytest.mark.timeout(60)


def _stream(conn: redis.Redis, key: str) -> list[bytes]:
    return [fields[CALL_FIELD] for _id, fields in conn.xrange(key)]


def _in_use(conn: redis.Redis) -> int:
    return len(conn.connection_pool._in_use_connections)  # type: ignore[attr-defined]


def _answer_on(conn: redis.Redis, stream: str, reply_key: str, after: int) -> threading.Thread:
    """A broker stand-in: once the stream holds `after` entries, push an answer."""

    def answer() -> None:
        while conn.xlen(stream) < after:
            conn.blpop([f"{reply_key}:tick"], timeout=0.01)
        conn.rpush(reply_key, b"answer")

    thread = threading.Thread(target=answer)
    thread.start()
    return thread


def test_recorded_calls_reach_the_stream_in_order_before_the_call_and_its_answer(
    conn: redis.Redis, prefix: str
) -> None:
    stream, reply_key = f"{prefix}:results", f"{prefix}:reply"
    line = CallLine(conn, stream)
    line.post(b"report 0")
    line.post(b"report 1")
    broker = _answer_on(conn, stream, reply_key, after=3)
    assert line.call(b"should_prune", reply_key, 10) == (reply_key.encode(), b"answer")
    broker.join()
    assert _stream(conn, stream) == [b"report 0", b"report 1", b"should_prune"]
    line.post(b"report 2")
    line.settle()  # the objective ended: its calls are in Redis, its connection given back
    assert _stream(conn, stream)[-1] == b"report 2"
    assert _in_use(conn) == 0


def test_a_call_with_no_answer_within_its_wait_gets_none(conn: redis.Redis, prefix: str) -> None:
    line = CallLine(conn, f"{prefix}:results")
    assert line.call(b"should_prune", f"{prefix}:reply", 0.05) is None
    line.settle()
    assert conn.xlen(f"{prefix}:results") == 1


def test_an_error_redis_answers_a_recorded_call_is_raised_by_the_next_call_and_by_settle(
    conn: redis.Redis, prefix: str
) -> None:
    stream = f"{prefix}:not-a-stream"
    conn.set(stream, b"a string")  # every XADD to it fails with WRONGTYPE
    line = CallLine(conn, stream)
    line.post(b"report 0")  # written; what Redis answered is not read yet
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        line.call(b"should_prune", f"{prefix}:reply", 10)  # raised at once: no wait for an answer
    line.post(b"report 1")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        line.settle()
    assert _in_use(conn) == 0 and conn.get(stream) == b"a string"
    assert conn.ping()  # the pool's connections are in step: nothing left unread


def test_calls_not_known_to_be_in_redis_when_the_connection_is_lost_are_appended_again(
    conn: redis.Redis, prefix: str
) -> None:
    stream, reply_key = f"{prefix}:results", f"{prefix}:reply"
    line = CallLine(conn, stream)
    own = line._taken()  # the line's connection: which Redis then cuts
    own.send_command("CLIENT", "ID")
    own_id = own.read_response()
    line.post(b"report 0")
    line.post(b"report 1")
    conn.client_kill_filter(_id=own_id)
    broker = _answer_on(conn, stream, reply_key, after=3)
    assert line.call(b"should_prune", reply_key, 10) == (reply_key.encode(), b"answer")
    broker.join()
    line.settle()
    sent = _stream(conn, stream)
    # At least once, in order: the client's own retries do no better.
    assert sent[:2] == [b"report 0", b"report 1"] and sent[-1] == b"should_prune", sent
