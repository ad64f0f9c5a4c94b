"""How the `optuna-rq` app's commands read and parse, whatever each declares.

`App` is a `typer.Typer` whose groups are `Group`s and whose commands are `Command`s, so that
every command, the ones added later too, gets the same two manners:

- Help that reads as the user types: every value has a metavar (`--n-trials N`, `--sampler
  [random|tpe|...]`, `NAME`), never typer's raw types (`<int range>`, `<list[str]>`,
  `{objective}`). A choice lists its choices; any other option without its own metavar is
  named after itself, as argparse does (`--gpus GPUS`).
- The top-level group's options (`--redis-url`, `--prefix`, the key and secret files...) are
  accepted after the command as well as before it: `optuna-rq workers --redis-url URL`, as
  `rq worker -u URL` is typed. Each command carries a copy of them that writes what it parses
  into the options the group's callback made (`ctx.obj`, a dataclass), so the command finds
  them where it always does. Given both before and after, the later one wins.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import typer
from typer import _click as click  # typer's vendored click: what its commands are built on
from typer._click.core import ParameterSource
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

__all__ = ["App", "Command", "Group", "choices_of", "global_option_names"]

F = TypeVar("F", bound=Callable[..., Any])

_TYPERS_OWN = ("install_completion", "show_completion")
"""typer's own top-level options: they install shell completion, and only before a command."""


class App(typer.Typer):
    """A `typer.Typer` made of `Group` and `Command` (unless a command names its own class)."""

    def __init__(self, **settings: Any) -> None:
        settings.setdefault("cls", Group)
        super().__init__(**settings)

    def command(self, *args: Any, **settings: Any) -> Callable[[F], F]:
        settings.setdefault("cls", Command)
        register: Callable[[F], F] = super().command(*args, **settings)
        return register


class Command(TyperCommand):
    """A command whose help names every value readably, and that takes the global options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _name_its_value(param)
        self.global_names: frozenset[str] = frozenset()  # the global options' copies (`Group`)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                pieces.append(_argument_usage(param))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        arguments, options, shared = [], [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if isinstance(param, TyperArgument):
                arguments.append((_argument_name(param), record[1]))
            elif param.name in self.global_names:
                shared.append(record[0].split()[0])
            else:
                options.append(record)
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        if options:
            with formatter.section("Options"):
                formatter.write_dl(options)
        if shared:
            root = ctx.find_root().command_path
            with formatter.section(
                f"Global options, before or after the command ('{root} --help')"
            ):
                formatter.write_text(", ".join(shared))


class Group(TyperGroup):
    """A group whose options name their values readably; the top-level one (the group with
    options) gives every command under it a copy of them (`Command.global_names`)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for param in self.params:
            _name_its_value(param)
        shared = [p for p in self.params if isinstance(p, TyperOption) and not _typers_own(p)]
        if not shared:
            return
        for command in _leaves(self):
            taken = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
            for option in shared:
                clash = taken.intersection((*option.opts, *option.secondary_opts))
                if clash or option.name in {p.name for p in command.params}:
                    raise TypeError(
                        f"command {command.name!r} declares {option.name!r} "
                        f"({', '.join(sorted(clash))}), a global option of {self.name!r}"
                    )
                command.params.append(_after_the_command(option))
            if isinstance(command, Command):
                command.global_names = frozenset(o.name for o in shared if o.name)


def global_option_names(group: click.Command) -> list[str]:
    """The long names of `group`'s global options (the ones its commands take too)."""
    return [
        _long_name(p) for p in group.params if isinstance(p, TyperOption) and not _typers_own(p)
    ]


def _leaves(group: TyperGroup) -> Iterator[click.Command]:
    for command in group.commands.values():
        if isinstance(command, TyperGroup):
            yield from _leaves(command)
        else:
            yield command


def _typers_own(param: click.Parameter) -> bool:
    return param.name in _TYPERS_OWN


def _after_the_command(option: TyperOption) -> TyperOption:
    """A copy of the group's `option` for a command: read from its command line only (the
    group's reads the environment), it sets the group's options' field of the same name."""
    shared = copy.copy(option)
    shared.envvar = None
    shared.show_envvar = False
    shared.expose_value = False
    own = option.callback  # --version's: print and exit

    def take(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        name = param.name or ""
        if ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
            return value
        if own is not None:
            value = own(ctx, param, value)
        options = ctx.obj
        if dataclasses.is_dataclass(options) and not isinstance(options, type):
            if name in {f.name for f in dataclasses.fields(options)}:
                ctx.obj = dataclasses.replace(options, **{name: value})
            elif own is None:
                raise TypeError(f"global option {name!r} has no field in {type(options).__name__}")
        return value

    shared.callback = take
    return shared


def _name_its_value(param: click.Parameter) -> None:
    """Give `param` a readable metavar if it has none: its choices (`[random|tpe]`), or its own
    name (`FILE` for an argument `file`, `GPUS` for `--gpus`). Flags take no value."""
    if param.metavar is not None:
        return
    if isinstance(param, TyperArgument):
        param.metavar = (param.name or "value").upper()
    elif isinstance(param, TyperOption) and not param.is_flag and not param.count:
        choices = choices_of(param)
        if choices:
            param.metavar = f"[{'|'.join(choices)}]"
        else:
            param.metavar = _long_name(param).lstrip("-").upper().replace("-", "_")


def choices_of(param: click.Parameter) -> list[str]:
    """The choices `param` takes, as typed (empty if it takes any value)."""
    descriptor = getattr(param, "type_descriptor", None)
    if descriptor is None or not descriptor.is_choice:
        return []
    return [str(getattr(c, "value", c)) for c in descriptor.choices or ()]


def _long_name(param: click.Parameter) -> str:
    names = [o for o in param.opts if o.startswith("--")] or list(param.opts)
    return max(names, key=len)


def _argument_name(param: TyperArgument) -> str:
    return f"{param.metavar}..." if param.nargs != 1 else str(param.metavar)


def _argument_usage(param: TyperArgument) -> str:
    """An argument in the usage line, as click writes it: `NAME`, `[NAME]` if optional."""
    name = _argument_name(param)
    return name if param.required else f"[{name}]"
