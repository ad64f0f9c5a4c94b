"""The `optuna-rq` command. Thin: it parses, validates, and hands over to the library.

Exit codes: 0 done, 1 a runtime error (Redis unreachable, a module that does not import),
2 a usage error (a bad option value). Errors print one line, no traceback (`--debug` shows it).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Annotated

import typer

from broker.connection import DEFAULT_PREFIX, ENV_PREFIX, ENV_REDIS_URL
from broker.errors import ConfigError, OptunaRQError

app = typer.Typer(
    name="optuna-rq",
    help="Run Optuna studies on RQ workers: a broker asks, workers run trials, results are told.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@dataclass(frozen=True, kw_only=True)
class GlobalOptions:
    redis_url: str | None
    prefix: str
    debug: bool


_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@app.callback()
def _global(
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
    ctx.obj = GlobalOptions(redis_url=redis_url, prefix=prefix, debug=debug)


@app.command()
def workers(
    ctx: typer.Context,
    modules: Annotated[
        list[str],
        typer.Option(
            "--import",
            "-i",
            help="A module whose objectives these workers run (repeat for several). "
            "Only objectives defined in these modules are ever imported.",
        ),
    ],
    count: Annotated[int, typer.Option("--count", "-n", min=1, help="Worker processes.")] = 1,
    queue: Annotated[
        str | None, typer.Option("--queue", "-q", help="Queue to serve. Default: the prefix.")
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
    ] = "INFO",
) -> None:
    """Start COUNT worker processes that run trials of objectives from the --import modules.

    SIGTERM or Ctrl-C stops them gracefully: each finishes its running trial first.
    """
    from broker.connection import connect, ping_or_raise, resolve_redis_url
    from workers.pool import WorkerPool, WorkerSettings

    options: GlobalOptions = ctx.obj
    level = log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"--log-level {log_level!r} is not one of DEBUG, INFO, WARNING, ERROR")
    logging.basicConfig(level=level, format=_LOG_FORMAT, stream=sys.stderr)
    url = resolve_redis_url(options.redis_url)
    ping_or_raise(connect(url), url)
    settings = WorkerSettings(
        redis_url=url,
        queue=queue or options.prefix,
        modules=tuple(modules),
        count=count,
        log_level=level,
    )
    raise typer.Exit(WorkerPool(settings).run())


def main() -> None:
    """Console entry point: run the app, turning our errors into one-line messages."""
    debug = "--debug" in sys.argv
    try:
        app(standalone_mode=False)
    except ConfigError as exc:
        _fail(exc, code=2, debug=debug)
    except OptunaRQError as exc:
        _fail(exc, code=1, debug=debug)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # click's own usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


def _fail(exc: BaseException, *, code: int, debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exception(exc)
    typer.echo(f"Error: {exc}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
