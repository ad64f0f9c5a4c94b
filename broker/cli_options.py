"""The options every `optuna-rq` command shares, and what commands make of them: the Redis
connection, a BrokerClient, the log setup."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import redis
import typer

from optuna_rq.connection import DEFAULT_PREFIX, ENV_PREFIX, ENV_REDIS_URL
from optuna_rq.errors import ConfigError

if TYPE_CHECKING:
    from optuna_rq.client import BrokerClient

__all__ = ["GlobalOptions", "configure_logging", "connect_redis", "global_options", "make_client"]

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True, kw_only=True)
class GlobalOptions:
    redis_url: str | None
    prefix: str
    debug: bool


def global_options(
    ctx: typer.Context,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            envvar=ENV_REDIS_URL,
            help="Redis to meet on (redis://, rediss://, unix://). "
            "Default: an embedded redis-server under the state directory.",
            show_default=False,
        ),
    ] = None,
    prefix: Annotated[
        str,
        typer.Option("--prefix", envvar=ENV_PREFIX, help="Key prefix and default queue name."),
    ] = DEFAULT_PREFIX,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    """The app's callback: every command finds these options as `ctx.obj`."""
    ctx.obj = GlobalOptions(redis_url=redis_url, prefix=prefix, debug=debug)


def connect_redis(options: GlobalOptions) -> tuple[str, redis.Redis]:
    """The Redis this command meets the others on; fails within seconds, naming the URL."""
    from optuna_rq.connection import connect, ping_or_raise, resolve_redis_url

    url = resolve_redis_url(options.redis_url)
    connection = connect(url)
    ping_or_raise(connection, url)
    return url, connection


def make_client(options: GlobalOptions) -> BrokerClient:
    """A BrokerClient on the options' Redis and prefix."""
    from optuna_rq.client import BrokerClient

    _url, connection = connect_redis(options)
    return BrokerClient(connection, options.prefix)


def configure_logging(log_level: str) -> str:
    """Log to stderr at `log_level` (DEBUG, INFO, WARNING or ERROR, any case); the level's name.
    ConfigError for any other level."""
    level = log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"--log-level {log_level!r} is not one of DEBUG, INFO, WARNING, ERROR")
    logging.basicConfig(level=level, format=_LOG_FORMAT, stream=sys.stderr)
    return level
