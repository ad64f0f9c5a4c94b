"""The options every `optuna-rq` command shares, and what commands make of them: the Redis
connection, a BrokerClient, the command signer, the log setup.

Every environment variable the command line reads is declared on its option here (or on the
command's own option, as `--lease-ttl`), so `--help` lists it; nothing below the CLI reads the
environment on its behalf.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from optuna_rq.errors import ConfigError
from optuna_rq.plumbing.locations import (
    DEFAULT_PREFIX,
    ENV_PREFIX,
    ENV_REDIS_PASSWORD,
    ENV_REDIS_PASSWORD_FILE,
    ENV_REDIS_URL,
    ENV_STATE_DIR,
)
from optuna_rq.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ENV_KEY,
    ENV_KEY_FILE,
    ENV_SECRET,
    ENV_SECRET_FILE,
    Role,
    Signer,
)
from optuna_rq.protocol.choices import StrChoice
from optuna_rq.protocol.liveness import BROKER_GRACE_S, BROKER_START_GRACE_S
from optuna_rq.protocol.signing import ENV_MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    import redis

    from optuna_rq.client import BrokerClient

__all__ = [
    "GlobalOptions",
    "LogLevel",
    "LogLevelOption",
    "StudyName",
    "WaitForBroker",
    "command_client",
    "configure_logging",
    "connect_existing_redis",
    "connect_redis",
    "global_options",
    "make_client",
    "read_client",
]

WaitForBroker = Annotated[
    bool,
    typer.Option(
        "--wait-for-broker",
        help="While no broker serves the prefix, say so and wait for one. Default: exit 3 once "
        f"the broker has not turned its loop for {BROKER_GRACE_S:g} s (it died, stopped or "
        f"froze), or none has started within {BROKER_START_GRACE_S:g} s.",
    ),
]
"""`wait` and `submit`'s option (`protocol.liveness`, `follow_watches.BrokerWatch`)."""


def _study_name(value: str | None) -> str | None:
    if value is not None and not value.strip():
        raise typer.BadParameter(f"{value!r}: a study's name is not blank")
    return value


StudyName = Annotated[str, typer.Argument(help="The study.", callback=_study_name)]
"""The study a command acts on: a name that could be a study's (checked before connecting)."""


class LogLevel(StrChoice):
    """`--log-level` of the long-running roles (any case)."""

    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@dataclass(frozen=True, kw_only=True)
class GlobalOptions:
    redis_url: str | None
    prefix: str
    debug: bool
    state_dir: Path | None = None
    secret: str | None = field(default=None, repr=False)
    secret_file: Path | None = None
    key_file: Path | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    redis_password: str | None = field(default=None, repr=False)
    redis_password_file: Path | None = None

    def password(self) -> str | None:
        """The Redis password given apart from the URL, read from its file if need be."""
        from optuna_rq.plumbing.connection import resolve_redis_password

        return resolve_redis_password(self.redis_password, self.redis_password_file)

    def signer(self, role: Role | None = Role.CLIENT) -> Signer:
        """The signer of every record this command writes or reads, as `role` (a no-op with
        signing off): from --secret, --secret-file, --key-file or OPTUNA_RQ_KEY."""
        return Signer.load(
            role,
            secret=self.secret or None,
            secret_file=self.secret_file,
            key=os.environ.get(ENV_KEY) or None,
            key_file=self.key_file,
            max_message_bytes=self.max_message_bytes,
        )

    def state(self) -> Path:
        """The state directory (created if missing): `--state-dir`, else the default. Only
        what keeps state on this machine calls it (the broker, workers, the embedded Redis, the
        keys it writes): a front door given a Redis URL creates nothing."""
        from optuna_rq.plumbing.locations import state_dir

        return state_dir(self.state_dir)


def package_version() -> str:
    try:
        return version("optuna-rq")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"optuna-rq {package_version()}")
        raise typer.Exit()


def global_options(
    ctx: typer.Context,
    redis_url: Annotated[
        str | None,
        typer.Option(
            "--redis-url",
            metavar="URL",
            envvar=ENV_REDIS_URL,
            help="Redis to meet on (redis://, rediss://, unix://; behind Sentinel: "
            "redis+sentinel://HOST:26379,HOST:26379/SERVICE, or rediss+sentinel://). "
            "Default: an embedded redis-server under the state directory.",
            show_default=False,
        ),
    ] = None,
    redis_password: Annotated[
        str | None,
        typer.Option(
            "--redis-password",
            metavar="PASSWORD",
            envvar=ENV_REDIS_PASSWORD,
            help="Redis password, apart from the URL: any character goes, nothing to escape; "
            "it wins over a password in the URL. Prefer the environment variable or "
            "--redis-password-file: a command line shows in ps.",
            show_default=False,
        ),
    ] = None,
    redis_password_file: Annotated[
        Path | None,
        typer.Option(
            "--redis-password-file",
            metavar="FILE",
            envvar=ENV_REDIS_PASSWORD_FILE,
            help="A file holding the Redis password (a mounted secret); one trailing newline "
            "is ignored.",
            show_default=False,
        ),
    ] = None,
    prefix: Annotated[
        str,
        typer.Option(
            "--prefix",
            envvar=ENV_PREFIX,
            metavar="PREFIX",
            help="Key prefix and default queue name.",
        ),
    ] = DEFAULT_PREFIX,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            metavar="DIR",
            envvar=ENV_STATE_DIR,
            help="Where the embedded Redis and the default study journal live. "
            "Default: $XDG_STATE_HOME/optuna-rq or ~/.local/state/optuna-rq.",
            show_default=False,
        ),
    ] = None,
    secret: Annotated[
        str | None,
        typer.Option(
            "--secret",
            metavar="SECRET",
            envvar=ENV_SECRET,
            help="Shared secret (16+ bytes) signing every message; set the same on the broker, "
            "the workers and here. Prefer the environment variable: a command line shows in ps.",
            show_default=False,
        ),
    ] = None,
    secret_file: Annotated[
        Path | None,
        typer.Option(
            "--secret-file",
            metavar="FILE",
            envvar=ENV_SECRET_FILE,
            help="A file holding the shared secret (a mounted secret); one trailing newline "
            "is ignored.",
            show_default=False,
        ),
    ] = None,
    key_file: Annotated[
        Path | None,
        typer.Option(
            "--key-file",
            metavar="FILE",
            envvar=ENV_KEY_FILE,
            help="A file holding this role's key from `optuna-rq keys` (a key per role: the "
            "broker, workers and front doors each sign as themselves). Or OPTUNA_RQ_KEY.",
            show_default=False,
        ),
    ] = None,
    max_message_bytes: Annotated[
        int,
        typer.Option(
            "--max-message-bytes",
            metavar="BYTES",
            envvar=ENV_MAX_MESSAGE_BYTES,
            min=1024,
            help="Largest message accepted, checked before decoding.",
        ),
    ] = DEFAULT_MAX_MESSAGE_BYTES,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    _version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_show_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """The app's callback: every command finds these options as `ctx.obj`."""
    ctx.obj = GlobalOptions(
        redis_url=redis_url,
        prefix=prefix,
        debug=debug,
        state_dir=state_dir,
        secret=secret,
        secret_file=secret_file,
        key_file=key_file,
        max_message_bytes=max_message_bytes,
        redis_password=redis_password,
        redis_password_file=redis_password_file,
    )
    if ctx.invoked_subcommand is None:  # bare `optuna-rq`: what there is to run
        typer.echo(ctx.get_help(), err=True)
        raise typer.Exit(2)


def _password_for(options: GlobalOptions) -> str | None:
    """The password to send; ConfigError if one is given with no URL to send it to."""
    password = options.password()
    if password is not None and not options.redis_url:
        raise ConfigError(
            f"a Redis password is set ({ENV_REDIS_PASSWORD} or {ENV_REDIS_PASSWORD_FILE}) but no "
            f"--redis-url ({ENV_REDIS_URL}): the embedded redis-server takes none; give the URL "
            "of the Redis it is for, or unset the password"
        )
    return password


def connect_redis(options: GlobalOptions) -> tuple[str, redis.Redis]:
    """The Redis this command meets the others on (the embedded one is started, under the state
    directory, if there is no URL and it is not running); fails within seconds, naming the URL.
    Only `broker`, `workers`, `submit` and `demo` may start a server: the other commands use
    `connect_existing_redis`."""
    from optuna_rq.plumbing.connection import connect, ping_or_raise
    from optuna_rq.plumbing.embedded import resolve_redis_url

    password = _password_for(options)
    # The state directory is made only if the embedded server is wanted (no URL).
    url = resolve_redis_url(options.redis_url, state=options.state_dir)
    connection = connect(url, password=password)
    ping_or_raise(connection, url)
    return url, connection


def connect_existing_redis(options: GlobalOptions) -> tuple[str, redis.Redis]:
    """As `connect_redis`, but never starts a redis-server, nor creates the state directory:
    for every command but `broker`, `workers`, `submit` and `demo`. With no URL and no embedded
    server running, RedisUnavailableError saying so, naming the fix."""
    from optuna_rq.errors import RedisUnavailableError
    from optuna_rq.plumbing.connection import connect, ping_or_raise
    from optuna_rq.plumbing.embedded import EmbeddedRedis
    from optuna_rq.plumbing.locations import state_path

    password = _password_for(options)
    url = options.redis_url
    if not url:  # typer read $OPTUNA_RQ_REDIS_URL into the option already
        state = state_path(options.state_dir)  # not created: a missing one holds no server
        embedded = EmbeddedRedis(state)
        if not state.is_dir() or (embedded.pid() is None and not embedded.socket.exists()):
            raise RedisUnavailableError(
                f"no Redis to reach: no --redis-url ({ENV_REDIS_URL}) and no embedded "
                f"redis-server running under {state} (`optuna-rq broker` or "
                "`optuna-rq submit` starts one)"
            )
        url = embedded.url
    connection = connect(url, password=password)
    ping_or_raise(connection, url)
    return url, connection


def make_client(options: GlobalOptions) -> BrokerClient:
    """A BrokerClient on the options' Redis and prefix (starting the embedded Redis if need be):
    for `submit`, which may be the first command run on a machine. The keys are read first: a
    bad one is a usage error before anything is started."""
    from optuna_rq.client import BrokerClient

    signer = options.signer()
    _url, connection = connect_redis(options)
    return BrokerClient(connection, options.prefix, signer=signer)


def command_client(options: GlobalOptions) -> BrokerClient:
    """A BrokerClient that sends commands about a study that exists (`cancel`, `set`,
    `enqueue`, `delete`): it never starts a redis-server (there is no study to act on where
    none runs), and says so naming the fix."""
    from optuna_rq.client import BrokerClient

    signer = options.signer()
    _url, connection = connect_existing_redis(options)
    return BrokerClient(connection, options.prefix, signer=signer)


def read_client(options: GlobalOptions) -> BrokerClient:
    """A BrokerClient for a command that only reads: it never starts a redis-server."""
    from optuna_rq.client import BrokerClient

    signer = options.signer(role=None)
    _url, connection = connect_existing_redis(options)
    return BrokerClient(connection, options.prefix, signer=signer)


def configure_logging(log_level: LogLevel) -> str:
    """Log to stderr at `log_level`; the level's name. Optuna's own logger follows the same level
    and handler, so its INFO lines are governed by --log-level too and never print around a
    progress bar."""
    level = str(log_level)
    logging.basicConfig(level=level, format=_LOG_FORMAT, stream=sys.stderr)
    _route_optuna_logs(level)
    return level


def _route_optuna_logs(level: str) -> None:
    import optuna

    # Optuna installs its own stderr handler at INFO; ours (the root's) formats like the rest.
    optuna.logging.disable_default_handler()
    optuna.logging.enable_propagation()
    optuna.logging.set_verbosity(logging.getLevelName(level))


LogLevelOption = Annotated[
    LogLevel,
    typer.Option("--log-level", case_sensitive=False, help="Log from this level up (any case)."),
]
"""The --log-level of the two long-running roles (Optuna's own lines follow it too)."""
