"""Every subcommand, given bad input, says so on one line and exits 2, with no Redis, so nothing
is started and nothing is sent: every case through the console entry point (`main`) in this
process, and a case of each kind through the real entry point (`python -m optuna_rq.cli.app`).
And the embedded redis-server: read-only commands never start it, `redis stop` ends it.

Then the app's manners, in this process through its entry point (`main`), every command
enumerated from the app: readable help listing every choice, shell completion of the choices,
the global options after any command, every argument checked before a server is started, and
no traceback for a usage error even with --debug."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import msgpack
import optuna
import pytest
import typer
from optuna.trial import TrialState
from typer import _click as click
from typer.core import TyperArgument, TyperGroup, TyperOption

from optuna_rq.cli.app import app, main
from optuna_rq.cli.options import GlobalOptions
from optuna_rq.cli.parsing import App, choices_of, global_option_names
from optuna_rq.errors import ConfigError, ProtocolError
from optuna_rq.plumbing.embedded import EmbeddedRedis
from optuna_rq.plumbing.processes import exited
from optuna_rq.protocol import Direction, Pruner, Sampler, StudySpec, StudyState
from optuna_rq.study.algorithms import make_pruner, make_sampler
from optuna_rq.workers.autoscale import parse_autoscale
from optuna_rq.workers.rq_worker import Isolation
from tests.conftest import redis_server
from tests.support.worker_processes import cli, cli_env

pytestmark = pytest.mark.timeout(60)

SUBMIT = ("submit", "a:b", "--n-trials", "1", "--concurrency", "1")

# (argv, a fragment of the one line it prints)
CASES = [
    # missing required options or arguments
    (("workers",), "Missing option '--import'"),
    (("submit", "a:b", "--concurrency", "1"), "Missing option '--n-trials'"),
    (("submit",), "Missing argument 'OBJECTIVE'"),
    (("wait",), "Missing argument 'NAME'"),
    (("cancel",), "Missing argument 'NAME'"),
    (("set",), "Missing argument 'NAME'"),
    (("trials",), "Missing argument 'NAME'"),
    (("best",), "Missing argument 'NAME'"),
    (("delete",), "Missing argument 'NAME'"),
    (("enqueue", "s"), "Missing argument 'FILE'"),
    # unknown options
    *(
        ((*cmd, "--bogus"), "No such option: --bogus")
        for cmd in (
            ("workers", "-i", "m"),
            ("broker",),
            SUBMIT,
            ("status",),
            ("wait", "s"),
            ("cancel", "s"),
            ("set", "s"),
            ("demo",),
            ("trials", "s"),
            ("best", "s"),
            ("delete", "s"),
            ("enqueue", "s", "f.yaml"),
            ("keys", "k"),
            ("dashboard",),
            ("redis", "stop"),
        )
    ),
    # values of the wrong type
    (("workers", "-i", "m", "--count", "two"), "Invalid value for '--count'"),
    (("broker", "--metrics-port", "http"), "Invalid value for '--metrics-port'"),
    (
        ("submit", "a:b", "--n-trials", "abc", "--concurrency", "1"),
        "Invalid value for '--n-trials'",
    ),
    (("wait", "s", "--timeout", "soon"), "Invalid value for '--timeout'"),
    (("set", "s", "--concurrency", "many"), "Invalid value for '--concurrency'"),
    (("demo", "--n-trials", "x"), "Invalid value for '--n-trials'"),
    (("delete", "s", "--timeout", "never"), "Invalid value for '--timeout'"),
    (("--max-message-bytes", "big", "status"), "Invalid value for '--max-message-bytes'"),
    # out-of-range values
    (("workers", "-i", "m", "--count", "0"), "greater than or equal to 1"),
    (("workers", "-i", "m", "--lease-ttl", "0.1"), "greater than or equal to 0.5"),
    (("broker", "--metrics-port", "70000"), "less than or equal to 65535"),
    (("broker", "--sampler-processes", "0"), "greater than or equal to 1"),
    (("submit", "a:b", "--n-trials", "0", "--concurrency", "1"), "greater than or equal to 1"),
    ((*SUBMIT, "--max-retries", "-1"), "greater than or equal to 0"),
    ((*SUBMIT, "--priority", "0"), "greater than or equal to 0.001"),
    ((*SUBMIT, "--trial-timeout", "1.5"), "whole seconds"),
    ((*SUBMIT, "--trial-timeout", "0.5"), "whole seconds"),
    (("status", "--state", "sleeping"), "Invalid value for '--state': 'sleeping' is not one of"),
    (("wait", "s", "--timeout", "-1"), "greater than or equal to 0"),
    (("set", "s", "--n-trials", "0"), "greater than or equal to 1"),
    (("demo", "--workers", "0"), "greater than or equal to 1"),
    (("trials", "s", "--format", "xml"), "Invalid value for '--format'"),
    ((*SUBMIT, "--sampler", "magic"), "'magic' is not one of 'random', 'tpe', 'cmaes'"),
    ((*SUBMIT, "--pruner", "magic"), "'magic' is not one of 'none', 'median'"),
    ((*SUBMIT, "--direction", "up"), "'up' is not one of 'minimize', 'maximize'"),
    (("workers", "-i", "m", "--isolation", "thread"), "'thread' is not one of 'process', 'fork'"),
    (("broker", "--log-level", "loud"), "Invalid value for '--log-level'"),
    (("cancel", " "), "Invalid value for 'NAME': ' ': a study's name is not blank"),
    (("--max-message-bytes", "10", "status"), "greater than or equal to 1024"),
    # other input checked before anything is sent
    ((*SUBMIT, "--param", "x={type:float,low:-1,high:1}"), "'type: float'"),
    ((*SUBMIT, "--storage", "foo://bar"), "'foo://bar' is not a storage URL"),
    ((*SUBMIT, "--storage", "sqlite:////dev/null/x.db"), "sqlite:////dev/null/x.db"),
    ((*SUBMIT, "--enqueue", "/no/such/sets.yaml"), "cannot read parameter-set file"),
    (("nope",), "No such command 'nope'"),
]


PROCESS_CASES = [
    case
    for case in CASES
    if case[1]
    in (
        "Missing option '--import'",
        "Invalid value for '--count'",
        "less than or equal to 65535",
        "'type: float'",
        "No such command 'nope'",
    )
    or case[0] == ("broker", "--bogus")
]
"""A case of each kind, through a real interpreter: its exit code and its stderr."""

# An unreachable Redis: a usage error must be found before any connection is tried.
UNREACHABLE = "redis://127.0.0.1:1/0"


def run(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    """`optuna-rq ARGS` as a process of its own."""
    env = cli_env(OPTUNA_RQ_STATE_DIR=str(state), OPTUNA_RQ_REDIS_URL=UNREACHABLE)
    return subprocess.run(cli(*args), env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def run_here(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    restore_logging: None,
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`run` in this process, through the console entry point, in the same environment."""
    monkeypatch.setenv("OPTUNA_RQ_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("OPTUNA_RQ_REDIS_URL", UNREACHABLE)

    def run_main_as_process(*args: str) -> subprocess.CompletedProcess[str]:
        code, out, err = run_main(*args, capsys=capsys)
        return subprocess.CompletedProcess(list(args), code, out, err)

    return run_main_as_process


@pytest.mark.parametrize(
    ("args", "message"), CASES, ids=lambda v: " ".join(v) if isinstance(v, tuple) else None
)
def test_bad_input_is_one_line_and_exit_2(
    args: tuple[str, ...], message: str, run_here: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    result = run_here(*args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.processes
@pytest.mark.parametrize(
    ("args", "message"), PROCESS_CASES, ids=lambda v: " ".join(v) if isinstance(v, tuple) else None
)
def test_bad_input_is_one_line_and_exit_2_from_a_real_interpreter(
    args: tuple[str, ...], message: str, tmp_path: Path
) -> None:
    result = run(*args, state=tmp_path)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and message in lines[0], lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_debug_adds_the_traceback_of_a_runtime_error(
    run_here: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    result = run_here("--debug", "status")  # its Redis is unreachable
    assert result.returncode == 1 and "Traceback" in result.stderr, result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("Error: cannot reach Redis")


@pytest.mark.processes
def test_bare_command_shows_the_help_and_exits_2(tmp_path: Path) -> None:
    result = run(state=tmp_path)
    assert result.returncode == 2
    assert "Usage: optuna-rq" in result.stderr and "submit" in result.stderr
    assert "Traceback" not in result.stderr


def test_version(run_here: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    result = run_here("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("optuna-rq ")


def test_help_lists_every_environment_variable_and_flags_as_flags(
    run_here: Callable[..., subprocess.CompletedProcess[str]],
) -> None:
    top = run_here("--help").stdout
    for var in (
        "OPTUNA_RQ_REDIS_URL",
        "OPTUNA_RQ_PREFIX",
        "OPTUNA_RQ_STATE_DIR",
        "OPTUNA_RQ_SECRET",
        "OPTUNA_RQ_MAX_MESSAGE_BYTES",
        "OPTUNA_RQ_REDIS_PASSWORD",
        "OPTUNA_RQ_REDIS_PASSWORD_FILE",
    ):
        assert var in top, var
    assert "--install-completion" in top
    assert "OPTUNA_RQ_LEASE_TTL" in run_here("workers", "--help").stdout
    submit = run_here("submit", "--help").stdout
    assert "<bool>" not in submit and "--wait " in submit


@pytest.mark.processes
def test_read_only_commands_never_start_a_redis_server(tmp_path: Path) -> None:
    env = cli_env(OPTUNA_RQ_STATE_DIR=str(tmp_path))
    env.pop("OPTUNA_RQ_REDIS_URL", None)
    for args in (("status",), ("wait", "s"), ("trials", "s"), ("best", "s")):
        result = subprocess.run(cli(*args), env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1, (args, result.stderr)
        assert "no embedded redis-server running" in result.stderr, result.stderr
        assert not (tmp_path / "redis.sock").exists() and not (tmp_path / "redis.pid").exists()


@pytest.mark.processes
def test_redis_stop_ends_the_embedded_server_a_command_started(embedded_state: Path) -> None:
    if redis_server() is None:
        pytest.skip("no redis-server binary for an embedded server")
    env = cli_env(OPTUNA_RQ_STATE_DIR=str(embedded_state))
    env.pop("OPTUNA_RQ_REDIS_URL", None)

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cli(*args), env=env, capture_output=True, text=True, timeout=60)

    # submit writes, so it starts the embedded server (no broker yet: the study waits for one)
    submitted = command(*SUBMIT, "--study-name", "s")
    assert submitted.returncode == 0, submitted.stderr
    pid = EmbeddedRedis(embedded_state).pid()
    assert pid is not None and not exited(pid)

    stopped = command("redis", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stderr.strip() == f"stopped the embedded redis-server under {embedded_state}"
    assert exited(pid)
    assert not (embedded_state / "redis.sock").exists()

    again = command("redis", "stop")  # nothing to stop is not an error
    assert again.returncode == 0, again.stderr
    assert "no embedded redis-server was running" in again.stderr


# -- in-process: the app's own manners, enumerated from the app ---------------------------------


def run_main(*argv: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`optuna-rq ARGV` through the console entry point, in this process: (code, out, err)."""
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    out = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 0), out.out, out.err


def commands() -> dict[tuple[str, ...], click.Command]:
    """Every command and group of the app by its path: () is `optuna-rq` itself."""
    found: dict[tuple[str, ...], click.Command] = {}

    def walk(command: click.Command, path: tuple[str, ...]) -> None:
        found[path] = command
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name))

    walk(typer.main.get_command(app), ())
    return found


def leaves() -> dict[tuple[str, ...], click.Command]:
    """The commands that run (not groups)."""
    return {path: c for path, c in commands().items() if not isinstance(c, TyperGroup)}


RAW_METAVAR = re.compile(r"<[a-z][a-z_ \[\]|,.]*>|\{[a-z_]+\}")
"""typer's raw metavars: `<int range>`, `<list[str]>`, `<str>`, `<path>`, `{objective}`."""


def test_every_help_names_every_value_readably_and_lists_every_choice(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for path, command in commands().items():
        code, out, err = run_main(*path, "--help", capsys=capsys)
        assert code == 0, (path, err)
        assert not RAW_METAVAR.search(out), (path, RAW_METAVAR.findall(out))
        shared = getattr(command, "global_names", frozenset())
        for param in command.params:
            if param.name in shared or getattr(param, "hidden", False):
                continue
            choices = choices_of(param)
            if choices:
                assert f"[{'|'.join(choices)}]" in out, (path, param.name)
            elif isinstance(param, TyperOption) and (param.is_flag or param.count):
                assert param.opts[0] in out, (path, param.name)
            else:  # a value: named by a readable metavar, in capitals
                assert param.metavar and param.metavar == param.metavar.upper(), (path, param)
                assert param.metavar in out, (path, param.name)
        if shared:  # and where the global options are
            assert "Global options, before or after the command" in out, path


def choice_options() -> list[tuple[tuple[str, ...], click.Parameter]]:
    return [(path, p) for path, c in leaves().items() for p in c.params if choices_of(p)]


def test_the_choices_are_the_protocols_and_the_broker_builds_each() -> None:
    offered = {(path, p.name): choices_of(p) for path, p in choice_options()}
    assert offered[("submit",), "sampler"] == Sampler.values()
    assert offered[("submit",), "pruner"] == Pruner.values()
    assert offered[("submit",), "directions"] == Direction.values()
    assert offered[("workers",), "isolation"] == [str(i) for i in Isolation]
    assert set(offered[("status",), "state"]) == {s.value for s in StudyState} | {"refused"}
    # A published trial's states (enqueued sets are not published: no WAITING), or refused.
    assert set(offered[("trials",), "state"]) == {
        s.name.lower() for s in TrialState if s is not TrialState.WAITING
    } | {"refused"}
    assert offered[("trials",), "output"] == ["table", "json", "csv"]
    for sampler in Sampler:
        try:
            with warnings.catch_warnings():  # QMC's: an experimental sampler
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                built = make_sampler(sampler, 0)
        except ImportError as exc:  # an optional package of Optuna's (cmaes, torch...)
            assert sampler in (Sampler.CMAES, Sampler.GP, Sampler.QMC), exc
            continue
        assert isinstance(built, optuna.samplers.BaseSampler), sampler
    assert {type(make_pruner(p)).__name__ for p in Pruner} == {
        "NopPruner",
        "MedianPruner",
        "HyperbandPruner",
        "SuccessiveHalvingPruner",
    }


def test_a_spec_carries_its_choices_as_the_strings_typed() -> None:
    spec = StudySpec(
        name="s",
        objective="m:f",
        space={},
        n_trials=1,
        concurrency=1,
        sampler="random",  # type: ignore[arg-type]  # as a script may pass them
        pruner="median",  # type: ignore[arg-type]
        directions=["maximize", "minimize"],  # type: ignore[list-item]
    )
    assert (spec.sampler, spec.pruner) == (Sampler.RANDOM, Pruner.MEDIAN)
    assert spec.directions == [Direction.MAXIMIZE, Direction.MINIMIZE]
    wire = msgpack.unpackb(spec.encode())
    assert (wire["sampler"], wire["pruner"], wire["directions"]) == (
        "random",
        "median",
        ["maximize", "minimize"],
    )
    assert StudySpec.decode(spec.encode()) == spec
    with pytest.raises(ConfigError, match="^sampler 'magic': choose one of random, tpe"):
        StudySpec(name="s", objective="m:f", space={}, n_trials=1, concurrency=1, sampler="magic")  # type: ignore[arg-type]
    forged = msgpack.packb({**wire, "pruner": "never"})
    with pytest.raises(ProtocolError, match="'pruner' must be one of none, median"):
        StudySpec.decode(forged)


@pytest.mark.parametrize(
    ("path", "param"),
    choice_options(),
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else v.name,
)
def test_shell_completion_offers_every_choice(
    path: tuple[str, ...],
    param: click.Parameter,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    words = ["optuna-rq", *path, param.opts[0], ""]
    monkeypatch.setenv("_OPTUNA_RQ_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", " ".join(words))
    monkeypatch.setenv("COMP_CWORD", str(len(words) - 1))
    code, out, _err = run_main(capsys=capsys)
    assert code == 0
    offered = out.split()
    # a case-insensitive choice may be offered in either case
    assert [o.lower() for o in offered] == [c.lower() for c in choices_of(param)], offered


# A valid value of each global option other than its default, to give it after a command.
GLOBAL_VALUES = {
    "--redis-url": "redis://example.invalid:6380/2",
    "--redis-password": "pw",
    "--redis-password-file": "/run/secrets/redis",
    "--prefix": "elsewhere",
    "--state-dir": "/srv/optuna-rq",
    "--secret": "s" * 32,
    "--secret-file": "/run/secrets/optuna-rq",
    "--key-file": "/run/secrets/client.key",
    "--max-message-bytes": "2048",
    "--debug": None,  # a flag
}


def options_seen(argv: list[str], root: click.Command) -> GlobalOptions:
    """The global options the command that `argv` names is given: the app (`root`, as built)
    parsed as it runs a command (each group's callback, then the next command's context),
    without running it."""
    command = root
    ctx = command.make_context("optuna-rq", list(argv))
    while isinstance(command, TyperGroup):
        name, sub, rest = command.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        assert sub is not None and name is not None
        ctx.invoked_subcommand = name
        if command.callback is not None:
            ctx.invoke(command.callback, **ctx.params)
        command, ctx = sub, sub.make_context(name, rest, parent=ctx)
    options = ctx.obj
    assert isinstance(options, GlobalOptions)
    return options


def required_args(command: click.Command) -> list[str]:
    """The least a command's line needs: each required argument and option, given "1"."""
    args: list[str] = []
    for param in command.params:
        if param.required:
            args += ["1"] if isinstance(param, TyperArgument) else [param.opts[0], "1"]
    return args


def test_every_global_option_is_taken_after_every_command() -> None:
    root = typer.main.get_command(app)
    shared = global_option_names(root)
    assert set(shared) == {*GLOBAL_VALUES, "--version"}, "give a new global option a value here"
    for path, command in leaves().items():
        line = [*path, *required_args(command)]
        plain = options_seen(line, root)
        for option, value in GLOBAL_VALUES.items():
            given = [option] if value is None else [option, value]
            before = options_seen([*given, *line], root)
            after = options_seen([*line, *given], root)
            assert after == before != plain, (path, option)
        # the later of two wins, as with any repeated option
        both = ["--prefix", "a", *line, "--prefix", "b"]
        assert options_seen(both, root).prefix == "b", path


def test_version_after_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = run_main("status", "--version", capsys=capsys)
    assert code == 0 and out.startswith("optuna-rq ")


def test_a_command_declaring_a_global_option_is_refused_when_the_app_is_built() -> None:
    clashing = App(name="x")

    @clashing.callback()
    def options(prefix: Annotated[str, typer.Option("--prefix")] = "p") -> None: ...

    @clashing.command()
    def run(prefix: Annotated[str, typer.Option("--prefix")] = "q") -> None: ...

    with pytest.raises(TypeError, match="declares 'prefix'"):
        typer.main.get_command(clashing)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """`broker` and `workers` set up logging (Optuna's too) before they check everything: put it
    back as it was for the rest of the session."""
    root, optuna_logger = logging.getLogger(), logging.getLogger("optuna")
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in (root, optuna_logger)]
    yield
    for logger, handlers, level, propagate in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(
    ("args", "message"), CASES, ids=lambda v: " ".join(v) if isinstance(v, tuple) else None
)
def test_debug_shows_no_traceback_for_a_usage_error(
    args: tuple[str, ...],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPTUNA_RQ_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("OPTUNA_RQ_REDIS_URL", "redis://127.0.0.1:1/0")
    for argv in (["--debug", *args], [*args, "--debug"]):
        code, out, err = run_main(*argv, capsys=capsys)
        assert code == 2, (argv, err)
        assert err.startswith("Error: ") and err.count("\n") == 1 and message in err, err
        assert "Traceback" not in err and out == ""


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another socket listens on."""
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        yield busy.getsockname()[1]


def bad_arguments(busy_port: int) -> dict[tuple[str, ...], list[tuple[str, ...]]]:
    """For every command, bad arguments that it must refuse before it starts anything."""
    short = ("--secret", "short")  # a global option after the command: a secret too short
    return {
        ("submit",): [
            (*SUBMIT[1:], "--sampler", "magic"),
            (*SUBMIT[1:], "--trial-timeout", "1.5"),
            (*SUBMIT[1:], *short),
            (*SUBMIT[1:], "--key-file", "/no/such/client.key"),
        ],
        ("status",): [("--state", "sleeping"), short],
        ("wait",): [("s", "--timeout", "-1"), ("",), ("s", *short)],
        ("cancel",): [("",), ("s", *short), ("s", "--key-file", "/no/such/client.key")],
        ("set",): [("s",), ("", "--n-trials", "2"), ("s", "--n-trials", "2", *short)],
        ("demo",): [("--workers", "0"), ("--n-trials", "many")],
        ("workers",): [
            ("-i", "m", "--autoscale", "3,1,2"),
            ("-i", "m", "--autoscale", "8", "--count", "2"),
            ("-i", "m", "--isolation", "thread"),
            ("-i", "m", "--path", "/no/such/dir"),
            ("-i", "m", "--queue", "a b"),
            ("-i", "m", "--health-port", str(busy_port)),
            ("-i", "m", *short),
        ],
        ("broker",): [
            ("--metrics-port", str(busy_port)),
            ("--log-level", "loud"),
            ("--storage", "bogus://nowhere"),
            (*short,),
        ],
        ("trials",): [("s", "--format", "xml"), ("",)],
        ("best",): [("",), ("s", *short)],
        ("delete",): [("",), ("s", "--timeout", "-1"), ("s", *short)],
        ("enqueue",): [("s", "/no/such/sets.yaml"), ("", "sets.yaml")],
        ("keys",): [("--bogus",)],
        ("dashboard",): [
            ("--port", "70000"),
            ("--storage", "journal:///no/such/studies.journal"),
            (*short,),
        ],
        ("redis", "stop"): [("--bogus",)],
        ("redis", "status"): [("--bogus",)],
    }


SERVING = {("broker",), ("workers",)}
"""The commands that serve until stopped: run as processes, in case one does not stop."""


def test_every_command_checks_its_arguments_before_it_starts_a_redis_server(
    embedded_state: Path,
    busy_port: int,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OPTUNA_RQ_REDIS_URL", raising=False)
    monkeypatch.setenv("OPTUNA_RQ_STATE_DIR", str(embedded_state))
    cases = bad_arguments(busy_port)
    assert set(cases) == set(leaves()), "give every command a bad argument here"
    for path, bad in cases.items():
        if path in SERVING:  # as processes: the test below
            continue
        for args in bad:
            code, _out, err = run_main(*path, *args, capsys=capsys)
            assert_refused_before_a_server(code, err, path, args, embedded_state)


@pytest.mark.processes
def test_the_serving_commands_check_their_arguments_before_they_start_a_redis_server(
    embedded_state: Path, busy_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPTUNA_RQ_REDIS_URL", raising=False)
    monkeypatch.setenv("OPTUNA_RQ_STATE_DIR", str(embedded_state))
    cases = bad_arguments(busy_port)
    serving = {  # all at once: each takes a second or two to start
        (path, args): subprocess.Popen(
            cli(*path, *args), env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for path in SERVING
        for args in cases[path]
    }
    for (path, args), process in serving.items():
        _out, raw = process.communicate(timeout=60)
        code, err = process.returncode, raw.decode()
        assert_refused_before_a_server(code, err, path, args, embedded_state)


def assert_refused_before_a_server(
    code: int, err: str, path: tuple[str, ...], args: tuple[str, ...], embedded_state: Path
) -> None:
    assert code == 2, (path, args, err)
    assert err.startswith("Error: ") and err.count("\n") == 1, err
    assert EmbeddedRedis(embedded_state).pid() is None, (path, args, "started one")
    assert not (embedded_state / "redis.sock").exists(), (path, args)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8,2", (2, 8)), ("2,8", (2, 8)), (" 8 , 0 ", (0, 8)), ("3,3", (3, 3)), ("8", (1, 8))],
)
def test_autoscale_takes_celerys_max_min_and_either_order(
    text: str, expected: tuple[int, int]
) -> None:
    assert parse_autoscale(text) == expected


@pytest.mark.parametrize("text", ["3,1,2", "8,-1", "0,0", "0", "a,b", "", "8,"])
def test_autoscale_refuses_what_names_no_min_and_max(text: str) -> None:
    with pytest.raises(ConfigError, match="--autoscale"):
        parse_autoscale(text)


def test_a_field_the_protocol_refuses_is_shown_as_the_flag_that_gave_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The spec names its fields (`patience`, `n_trials`); the command line shows its flags."""
    with pytest.raises(ConfigError) as refused:
        StudySpec(name="s", objective="m:f", space={}, n_trials=3, concurrency=1, patience=5)
    assert str(refused.value) == "patience must be an integer from 1 to n_trials (3), got 5"
    code, _out, err = run_main(*SUBMIT[:2], "--n-trials", "3", "--concurrency", "1",
                               "--patience", "5", capsys=capsys)  # fmt: skip
    assert code == 2
    assert err.strip() == "Error: --patience must be an integer from 1 to --n-trials (3), got 5"


def test_every_field_a_spec_error_may_name_is_a_flag_of_submit() -> None:
    import dataclasses

    from optuna_rq.cli.field_flags import flag_of

    root = typer.main.get_command(app)
    assert isinstance(root, TyperGroup)
    flags = {o for p in root.commands["submit"].params for o in (*p.opts, *p.secondary_opts)}
    not_given_by_a_flag = {"objective", "space", "submitted_at", "incarnation", "v"}
    for field in dataclasses.fields(StudySpec):
        if field.name not in not_given_by_a_flag:
            assert flag_of(field.name) in flags, field.name


def test_a_batch_with_a_trial_timeout_is_refused_naming_both_flags(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """RQ arms its timeout once a job: the trials of a batch cannot each have theirs."""
    code, _out, err = run_main(*SUBMIT[:2], "--n-trials", "8", "--concurrency", "8",
                               "--batch", "4", "--trial-timeout", "3", capsys=capsys)  # fmt: skip
    assert code == 2
    assert err.strip() == (
        "Error: --batch 4 cannot go with --trial-timeout: RQ times a job, not each trial of a "
        "batch; drop one of them"
    )
    code, _out, err = run_main(*SUBMIT[:2], "--n-trials", "8", "--concurrency", "8",
                               "--batch", "33", capsys=capsys)  # fmt: skip
    assert code == 2
    assert err.strip() == "Error: --batch must be an integer from 1 to 32, got 33"
