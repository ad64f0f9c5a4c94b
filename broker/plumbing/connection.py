"""How every process (broker, workers, CLI, tests) gets its Redis client, and checks it answers.

One URL (`--redis-url` or `$OPTUNA_RQ_REDIS_URL`) names the Redis; without one, an embedded
redis-server (`optuna_rq.plumbing.embedded`) runs on a unix socket in a state directory that every
optuna-rq process on the machine finds. Its password may come apart from the URL
(`$OPTUNA_RQ_REDIS_PASSWORD`, or a file named by `$OPTUNA_RQ_REDIS_PASSWORD_FILE`), so that any
character goes and nothing needs URL-escaping; given both ways, the one apart from the URL wins.
Only `resolve_redis_password` reads the environment here (`locations` and `embedded` read the rest).
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    BusyLoadingError,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, SentinelConnectionPool

from optuna_rq.errors import ConfigError, RedisUnavailableError
from optuna_rq.plumbing.locations import (
    ENV_REDIS_PASSWORD,
    ENV_REDIS_PASSWORD_FILE,
    FIX_NO_REDIS,
    redact_url,
)
from optuna_rq.plumbing.outages import backoff, name_server
from optuna_rq.plumbing.sentinel import (
    SENTINEL_SCHEMES,
    SentinelUrl,
    derived_sentinel_pool,
    is_sentinel_url,
    sentinel_client,
)

__all__ = [
    "ENV_REDIS_PASSWORD",
    "ENV_REDIS_PASSWORD_FILE",
    "connect",
    "derived_pool",
    "key",
    "ping_or_raise",
    "resolve_redis_password",
]

URL_SCHEMES = ("redis", "rediss", "unix", *SENTINEL_SCHEMES)

# A client's own retries wait at random up to 0.2, 0.4, 0.8, 1.6, 2 s (`outages.backoff`:
# jittered, so clients that failed together do not retry together): the default 5 ride out about
# 2.5 s of a Redis restart or failover on average; a longer outage is its caller's
# (`redis_waits.wait_for_redis`).
RETRY_BASE_S = 0.1
RETRY_CAP_S = 2.0
# redis-py PINGs an idle connection before reusing it after this long, so a connection a
# NAT or a Redis restart silently dropped is replaced instead of failing the next command.
HEALTH_CHECK_INTERVAL_S = 30

_logger = logging.getLogger(__name__)


# -- credentials and keys ---------------------------------------------------------------


def resolve_redis_password(
    password: str | None = None, password_file: str | Path | None = None
) -> str | None:
    """The Redis password given apart from the URL: `password`, else the contents of
    `password_file` (one trailing newline dropped, as `echo` and editors leave one), else
    `$OPTUNA_RQ_REDIS_PASSWORD`, else the file `$OPTUNA_RQ_REDIS_PASSWORD_FILE` names; None if
    none is given. ConfigError if both ways are given, or the file is unreadable or empty."""
    if password is None and password_file is None:
        password = os.environ.get(ENV_REDIS_PASSWORD) or None
        password_file = os.environ.get(ENV_REDIS_PASSWORD_FILE) or None
    if password is not None and password_file is not None:
        raise ConfigError(
            f"the Redis password is given twice ({ENV_REDIS_PASSWORD} and "
            f"{ENV_REDIS_PASSWORD_FILE}): give one of them"
        )
    if password_file is None:
        return password
    try:
        text = Path(password_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(
            f"{ENV_REDIS_PASSWORD_FILE} {str(password_file)!r} cannot be read ({reason}); "
            "give the path of a readable file holding the password"
        ) from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ConfigError(
            f"{ENV_REDIS_PASSWORD_FILE} {str(password_file)!r} is empty; put the password in it"
        )
    return text


def key(prefix: str, *parts: str) -> str:
    """`prefix:part:part...`. Every key optuna-rq writes lives under one prefix."""
    if not prefix or any(c.isspace() for c in prefix):
        raise ConfigError(f"key prefix {prefix!r} must be non-empty and contain no whitespace")
    return ":".join((prefix, *parts))


# -- clients ------------------------------------------------------------------------------


def connect(
    url: str,
    *,
    password: str | None = None,
    retries: int = 5,
    socket_timeout_s: float | None = None,
    connect_timeout_s: float = 5.0,
) -> redis.Redis:
    """A redis-py client for `url` (redis://, rediss://, unix://, and redis+sentinel:// or
    rediss+sentinel:// for a Redis behind Sentinel: `optuna_rq.plumbing.sentinel`), retrying with
    backoff. Every client optuna-rq makes is made here, or derived from one made here
    (`derived_pool`).

    `password` (from `resolve_redis_password`) is sent as is, never parsed out of a URL, and
    overrides a password in `url`. Commands that fail with a connection error or timeout are
    retried `retries` times with jittered exponential backoff. Responses are bytes
    (`decode_responses=False`), as RQ needs. Lazy: nothing is sent until the first command;
    call `ping_or_raise` to fail fast. `socket_timeout_s=None` blocks reads indefinitely, which
    RQ's blocking dequeue needs.
    """
    if retries < 0:
        raise ConfigError(f"retries={retries}: must be >= 0")
    # Set explicitly: Redis.from_url() otherwise gets *no* retries (Retry(NoBackoff(), 0)),
    # unlike Redis(host=...), whose default is 10 retries with jitter.
    retry = Retry(backoff(base_s=RETRY_BASE_S, cap_s=RETRY_CAP_S), retries)
    settings: dict[str, Any] = dict(
        retry=retry,
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=connect_timeout_s,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
        decode_responses=False,
    )
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in URL_SCHEMES:
        given = f"the scheme {scheme + sep!r} is not Redis's" if sep else "no scheme"
        raise ConfigError(
            f"bad Redis URL {redact_url(url)!r}: {given}; start it with one of "
            f"{', '.join(s + '://' for s in URL_SCHEMES)}"
        )
    if is_sentinel_url(url):
        target = SentinelUrl.parse(url)
        if password is not None and target.options.get("password"):
            _two_passwords(url)
        client = sentinel_client(target, password=password, settings=settings)
    else:
        client = _plain_client(url, password=password, settings=settings)
    name_server(client, redact_url(url))  # what its outage lines call it (`outages`)
    return client


def _plain_client(url: str, *, password: str | None, settings: dict[str, Any]) -> redis.Redis:
    try:
        client = redis.Redis.from_url(url, **settings)
    except ValueError as exc:
        raise ConfigError(f"bad Redis URL {redact_url(url)!r}: {exc}") from exc
    if password is not None:
        # Set on the pool, not passed to from_url(), where the URL's own password would win.
        # No connection exists yet: every one the pool opens authenticates with it.
        kwargs = client.connection_pool.connection_kwargs
        if kwargs.get("password"):
            _two_passwords(url)
        kwargs["password"] = password
    return client


def _two_passwords(url: str) -> None:
    _logger.warning(
        "the Redis URL %s has a password, and %s gives another: using the latter",
        redact_url(url),
        ENV_REDIS_PASSWORD,
    )


def ping_or_raise(conn: redis.Redis, url: str, *, timeout_s: float = 2.0) -> None:
    """PING the server `conn` talks to, giving up after `timeout_s` in total.

    Raises RedisUnavailableError naming the (redacted) URL and the fix. Uses a throwaway
    connection with the same settings but no retries and short timeouts, because `conn`'s own
    retries and `socket_timeout_s=None` could otherwise hold the caller far longer.
    """
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        remaining = deadline - time.monotonic()
        probe = _probe_client(conn, max(0.05, min(1.0, remaining)))
        try:
            probe.ping()
            return
        except (AuthenticationError, AuthenticationWrongNumberOfArgsError) as exc:
            raise RedisUnavailableError(
                f"Redis at {redact_url(url)} refused the credentials: {exc}; "
                f"check the user and password (in the URL, or {ENV_REDIS_PASSWORD})"
            ) from exc
        except MasterNotFoundError as exc:
            if "Authentication" in str(exc) or "NOAUTH" in str(exc):
                raise RedisUnavailableError(
                    f"the sentinels of {redact_url(url)} refused the credentials; give "
                    "them theirs in the URL (sentinel_auth=same: the servers' user and password; "
                    "or sentinel_username and sentinel_password)"
                ) from exc
            last = exc
        except BusyLoadingError as exc:  # up, but still loading its data: worth waiting for
            last = exc
        except RedisError as exc:
            last = exc
        finally:
            probe.close()
        if time.monotonic() + 0.1 >= deadline:
            break
        time.sleep(0.1)
    raise RedisUnavailableError(_unreachable(url, timeout_s, last)) from last


def _no_primary(url: str, error: MasterNotFoundError) -> str:
    """What went wrong asking the sentinels of `url` for its primary, in a line: redis-py's own
    message holds the repr of every sentinel client it asked."""
    target = SentinelUrl.parse(url)
    # Its message ends with "<sentinel client> - <ErrorClass>" for each sentinel that failed.
    failures = re.findall(r" - (?:\w+:)?(\w+Error)\b", str(error))
    why = (
        f"the sentinels failed with {', '.join(sorted(set(failures)))}"
        if failures
        else f"no sentinel monitors a primary named {target.service!r}"
    )
    where = ",".join(f"{host}:{port}" for host, port in target.sentinels)
    return (
        f"no primary for service {target.service!r} from the sentinels at {where} ({why}); "
        "check the sentinels' addresses and the service name (the one `sentinel monitor` names)"
    )


def _unreachable(url: str, timeout_s: float, last: Exception | None) -> str:
    if isinstance(last, MasterNotFoundError):
        return f"cannot reach Redis at {redact_url(url)} within {timeout_s:g}s: " + _no_primary(
            url, last
        )
    return f"cannot reach Redis at {redact_url(url)} within {timeout_s:g}s ({last}); {FIX_NO_REDIS}"


def _probe_client(conn: redis.Redis, timeout_s: float) -> redis.Redis:
    probe_pool = derived_pool(
        conn,
        retry=Retry(NoBackoff(), 0),
        retry_on_error=[],
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=0,
    )
    client = redis.Redis(connection_pool=probe_pool)
    client.auto_close_connection_pool = True
    return client


_POOL_OWNED = {
    "connection_pool",  # a Sentinel pool's own handle, given to each of its connections
    "himport_registry",
    "maint_notifications_config",
    "maint_notifications_pool_handler",
    "oss_cluster_maint_notifications_handler",
    "orig_host_address",
    "orig_socket_timeout",
    "orig_socket_connect_timeout",
}
"""What redis-py's pool puts in its connections' settings for itself (redis-py 7 and later): a
new pool makes its own, for its own protocol (maintenance notifications need RESP3, and are
refused with RESP2) and timeouts."""


def derived_pool(conn: redis.Redis, **overrides: Any) -> redis.ConnectionPool:
    """A new connection pool for the server `conn` talks to (behind Sentinel: for the primary its
    sentinels name), with `conn`'s settings (address, credentials, TLS, retries, timeouts) but
    `overrides`. For a client that must differ from one `connect` made: the broker's fenced
    client (RESP2), the fail-fast probe of `ping_or_raise`."""
    pool = conn.connection_pool
    kwargs = {k: v for k, v in pool.connection_kwargs.items() if k not in _POOL_OWNED}
    kwargs |= overrides
    if isinstance(pool, SentinelConnectionPool):
        return derived_sentinel_pool(pool, kwargs, overrides)
    return redis.ConnectionPool(
        connection_class=pool.connection_class, max_connections=pool.max_connections, **kwargs
    )
