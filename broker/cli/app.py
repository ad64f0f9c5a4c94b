"""The `optuna-rq` command. Thin: it parses, validates, and hands over to the library.

Exit codes: 0 done, 1 a runtime error (Redis unreachable, a module that does not import),
2 a usage error (a bad option value), 3 (`wait`, `submit --wait`) no broker serves the prefix,
130 interrupted (Ctrl-C). Errors print one line, no traceback (`--debug` shows it, but for a
usage error). Every input is checked before anything connects or starts a server.

The app is made of `parsing`'s classes: readable help, and the global options (`--redis-url`,
`--prefix`...) accepted after the command as well as before it. Each group of commands is a
module of its own (`submit_command`, `status_commands`, `change_commands`, `study_commands`,
`broker_command`, `workers_command`, `key_commands`, `dashboard_command`, `redis_command`); this
one lists them and is the entry point (`main`), which turns every error into one line and an exit
code.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from optuna_rq.cli.broker_command import broker
from optuna_rq.cli.change_commands import cancel, set_command
from optuna_rq.cli.dashboard_command import dashboard
from optuna_rq.cli.field_flags import shown
from optuna_rq.cli.key_commands import keys
from optuna_rq.cli.options import global_options
from optuna_rq.cli.parsing import App
from optuna_rq.cli.redis_command import redis_app
from optuna_rq.cli.status_commands import status, wait_command
from optuna_rq.cli.study_commands import best, delete, enqueue, trials
from optuna_rq.cli.submit_command import submit
from optuna_rq.cli.workers_command import workers
from optuna_rq.errors import OptunaRQError

app = App(
    name="optuna-rq",
    help="Run Optuna studies on RQ workers: a broker asks, workers run trials, results are "
    "told.\n\nThe options below go before the command or after it.",
    # Bare `optuna-rq` shows the help from the callback (exit 2), not click's NoArgsIsHelpError.
    invoke_without_command=True,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    # Plain click help: flags shown as flags (not `--wait <bool>`), docstring paragraphs
    # reflowed as paragraphs, every option's environment variable listed.
    rich_markup_mode=None,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)

app.callback()(global_options)


def demo(
    n_trials: Annotated[
        int, typer.Option("--n-trials", min=1, metavar="N", help="Trials to run.")
    ] = 60,
    workers: Annotated[
        int,
        typer.Option("--workers", min=1, max=64, metavar="N", help="Worker processes to start."),
    ] = 2,
) -> None:
    """Run the bundled example study on a private embedded Redis, a broker and two workers.

    Shows the progress, prints the best trial, and leaves nothing running.
    """
    from optuna_rq.cli.demo import run_demo

    run_demo(n_trials=n_trials, workers=workers)


# Listed in --help in this order.
app.command()(submit)
app.command()(status)
app.command("wait")(wait_command)
app.command()(cancel)
app.command("set")(set_command)
app.command()(demo)
app.command()(workers)
app.command()(broker)
app.command()(trials)
app.command()(best)
app.command()(delete)
app.command()(enqueue)
app.command()(keys)
app.command()(dashboard)
app.add_typer(redis_app)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app; every error becomes one line on stderr and an exit code
    (2 for a usage error, 1 for any other). With --debug, an error that is not a usage error
    shows its traceback: a usage error says all there is (the input and the fix)."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        # Not standalone: errors come back to us, to be printed as one line. Typer >= 0.29
        # raises its own (vendored) click's errors, all `typer.TyperException`s, never
        # `click.ClickException`s: pyproject pins the typer that does so.
        code = app(args=args, prog_name="optuna-rq", standalone_mode=False)
    except OptunaRQError as exc:
        _fail(exc, shown(exc), code=exc.exit_code, debug=debug)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        from optuna_rq.terminal.progress import EXIT_INTERRUPTED

        typer.echo("Aborted.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except typer.TyperException as exc:  # click's usage errors: a bad option, a missing one...
        _fail(exc, _usage_message(exc), code=exc.exit_code, debug=debug)
    except Exception as exc:  # a bug, or a library's error we did not expect: still one line
        _fail(
            exc,
            f"unexpected {type(exc).__name__}: {exc}"
            + ("" if debug else " (--debug shows where; please report it)"),
            code=1,
            debug=debug,
        )
    sys.exit(code if isinstance(code, int) else 0)


USAGE_ERROR = 2
"""The exit code of a usage error (a ConfigError, click's errors): the input is wrong."""


def _usage_message(exc: typer.TyperException) -> str:
    """The error on one line, with where to look: `... (see 'optuna-rq submit --help')`."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    # typer checks values with pydantic, whose messages start with the kind of error
    message = message.replace(": Value error, ", ": ")
    ctx = getattr(exc, "ctx", None)
    if ctx is not None and ctx.command.get_help_option(ctx) is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


def _fail(exc: BaseException, message: str, *, code: int, debug: bool) -> None:
    if debug and code != USAGE_ERROR:
        import traceback

        traceback.print_exception(exc)
    typer.echo(f"Error: {message}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
