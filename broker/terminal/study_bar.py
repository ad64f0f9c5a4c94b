"""A study's progress bar on a terminal (`StudyBar`), and the console it draws on (`make_console`).

Output that is not a terminal is never wrapped nor cut (a command printed for copying stays one
line), and log records emitted while a bar is live are printed above it instead of through it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from rich.console import Console, RenderableType
from rich.constrain import Constrain
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from optuna_rq.protocol import StudyStatus
from optuna_rq.terminal.status_view import beside, best_summary

__all__ = ["StudyBar", "make_console"]

_UNBOUNDED_WIDTH = 1 << 16
"""The width of output that is not a terminal: rich would fit it (and the bar's last line,
cut with an ellipsis) to 80 columns, and a command printed for copying must stay whole."""


def make_console(*, stderr: bool = False) -> Console:
    """A console that wraps lines to a terminal's width, and never wraps or cuts anything else.

    COLUMNS is a terminal's width, and rich reads it for a terminal only here: in the
    environment of a pipe it is not a width anyone asked for. GNU readline exports COLUMNS and
    LINES from any Python process that imported it (pytest does, as it starts), 80 by 24 from
    terminfo when it has no terminal, and every process started from there inherits them."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console.soft_wrap = True
        console.width = _UNBOUNDED_WIDTH
    return console


class _Bar(Progress):
    """The progress bar, two columns short of a terminal's width: the terminal echoes Ctrl-C
    as `^C` after the bar, and on a line that filled the width that wraps, so that the bar's
    last redraw lands on the next line and the bar shows twice."""

    def get_renderable(self) -> RenderableType:
        live = getattr(self, "live", None)  # None while Progress.__init__ builds it
        if live is None or not live.console.is_terminal:
            return super().get_renderable()
        return Constrain(super().get_renderable(), width=live.console.width - 2)


class StudyBar:
    """One study's progress bar on `console`: trials done of its budget, its best, retries and
    failures by reason, and a note (what it waits for). While it shows, log records print
    above it (`_logs_above`). Updated with `show` from any thread."""

    def __init__(self, console: Console, name: str) -> None:
        self.console = console
        self.name = name
        self._stack = contextlib.ExitStack()
        self._progress: Progress | None = None
        self._task: Any = None

    def __enter__(self) -> StudyBar:
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[best]}  {task.fields[failures]}"),
            TimeElapsedColumn(),
        )
        with contextlib.ExitStack() as stack:
            stack.enter_context(_logs_above(self.console))
            progress = _Bar(*columns, console=self.console, transient=False)
            self._progress = stack.enter_context(progress)
            self._task = progress.add_task(escape(self.name), total=None, best="", failures="")
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stack.close()

    def show(self, snap: StudyStatus, note: str = "") -> None:
        """Show `snap` (done of `n_trials`, best, failures) and `note` beside it."""
        assert self._progress is not None, "show() inside `with StudyBar(...)`"
        self._progress.update(
            self._task,
            total=snap.n_trials,
            completed=min(snap.done, snap.n_trials),
            best=escape(best_summary(snap)),
            failures=escape("  ".join(filter(None, (beside(snap), note)))),
        )


class _ConsoleHandler(logging.Handler):
    def __init__(self, console: Console, formatter: logging.Formatter | None) -> None:
        super().__init__()
        self.console = console
        self.setFormatter(formatter or logging.Formatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.print(self.format(record), markup=False, highlight=False)
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def _logs_above(console: Console) -> Iterator[None]:
    """While a bar is live, the root logger's stream handlers print through `console` (above
    the bar), at their own level and format; restored afterwards."""
    root = logging.getLogger()
    swapped = [
        h
        for h in root.handlers
        if type(h) is logging.StreamHandler
        and getattr(h.stream, "name", None) in ("<stderr>", "<stdout>")
    ]
    replacements = []
    for handler in swapped:
        replacement = _ConsoleHandler(console, handler.formatter)
        replacement.setLevel(handler.level)
        root.removeHandler(handler)
        root.addHandler(replacement)
        replacements.append(replacement)
    try:
        yield
    finally:
        for replacement in replacements:
            root.removeHandler(replacement)
        for handler in swapped:
            root.addHandler(handler)
