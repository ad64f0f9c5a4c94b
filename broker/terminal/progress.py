"""A study's progress on a terminal: the bar of `wait`, `submit --wait`, `demo` and a remote
Optimizer (`StudyBar`), and following a study until it ends (`follow_study`). How a status reads
(the lines of `status`, its detail) is `status_view`'s, re-exported here.

Output that is not a terminal is never wrapped nor cut (a command printed for copying stays one
line), and log records emitted while a bar is live are printed above it instead of through it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from rich.console import Console, RenderableType
from rich.constrain import Constrain
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from optuna_rq.client import BrokerClient, queued_status
from optuna_rq.errors import ConfigError, ProtocolError
from optuna_rq.protocol import StudySpec, StudyStatus, liveness
from optuna_rq.protocol.liveness import (
    BROKER_GRACE_S,
    BrokerLiveness,
    BrokerState,
    DriverLiveness,
    judge_driver,
    server_clock_s,
)
from optuna_rq.terminal.status_view import (
    REFUSED,
    ShownState,
    beside,
    best_summary,
    status_detail,
    status_lines,
    waiting_note,
)

__all__ = [
    "follow",
    "EXIT_INTERRUPTED",
    "EXIT_NO_BROKER",
    "REFUSED",
    "BrokerWatch",
    "DriverWatch",
    "ShownState",
    "StudyBar",
    "best_summary",
    "follow_study",
    "make_console",
    "status_detail",
    "status_lines",
    "waiting_note",
]

EXIT_NO_BROKER = 3
"""What `wait` and `submit --wait` exit with when no broker serves the prefix (`BrokerWatch`:
the broker died or stopped, or none started), or, for a study a remote Optimizer runs, when its
process stopped turning (`DriverWatch`), unless `--wait-for-broker`."""

EXIT_INTERRUPTED = 130
"""What a command stopped by Ctrl-C exits with (128 + SIGINT, as a shell reports it)."""


_UNBOUNDED_WIDTH = 1 << 16
"""The width of output that is not a terminal: rich would fit it (and the bar's last line,
cut with an ellipsis) to 80 columns, and a command printed for copying must stay whole."""


def make_console(*, stderr: bool = False) -> Console:
    """A console that wraps lines to a terminal's width, and never wraps or cuts anything else
    (unless COLUMNS asks for a width)."""
    console = Console(stderr=stderr)
    if not console.is_terminal:
        console.soft_wrap = True
        if not os.environ.get("COLUMNS"):
            console.width = _UNBOUNDED_WIDTH
    return console


def follow(
    client: BrokerClient,
    study: str,
    *,
    timeout_s: float | None = None,
    console: Console | None = None,
    submitted: StudySpec | None = None,
    wait_for_broker: bool = False,
) -> int:
    """Show the study's progress on `console` (default: stderr) until it ends, or until
    `timeout_s` passes; with `submitted`, until the broker took that submission and the
    study ended after it. Returns 0 if it finished with a COMPLETE trial, 1 if not
    (cancelled, failed, no trial completed, timed out), 3 (`EXIT_NO_BROKER`) as soon as no
    broker has served the prefix for `BROKER_GRACE_S`, unless `wait_for_broker`: then it
    says so and waits on for one."""
    since = None if submitted is None else submitted.submitted_at
    return follow_study(
        client,
        study,
        timeout_s=timeout_s,
        console=console,
        since=since,
        queued=None if submitted is None else queued_status(submitted),
        wait_for_broker=wait_for_broker,
    )


def follow_study(
    client: BrokerClient,
    name: str,
    *,
    timeout_s: float | None,
    console: Console | None = None,
    since: float | None = None,
    queued: StudyStatus | None = None,
    wait_for_broker: bool = False,
) -> int:
    """Show a progress bar until the study ends (with `since`, a submission's `submitted_at`:
    ends after the broker took that submission). Exit code 0 if it finished with a COMPLETE
    trial; `EXIT_NO_BROKER` once no broker serves the prefix (`BrokerWatch`), or, for a study
    a remote Optimizer runs, once its process stopped (`DriverWatch`) (with `wait_for_broker`:
    it says so, and waits on for one); else 1. A line says why.

    Only a status the broker wrote counts (`BrokerClient.status`): one it did not sign is
    ignored, said once, and the last status believed stays; if it is the first one read, and
    the broker holds no study of that name, it is an error (ProtocolError, exit 1). An ended
    one of another submission than the broker holds is not the end either
    (`BrokerClient.is_current`). `queued` (the submission's `queued_status`) shows until the
    broker's first status comes: with signing on, a front door writes none of its own."""
    console = console or make_console(stderr=True)
    believed = _first_believed(client, name, queued)
    # What moves the study: the prefix's broker, or the process of the Optimizer that runs it.
    watch: BrokerWatch | DriverWatch = (
        DriverWatch(client, believed) if believed.last.driven else BrokerWatch(client)
    )
    waiting_for_broker = False
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with StudyBar(console, name) as bar:
        while True:
            snap = believed.read()
            for note in believed.notes():
                console.print(f"[yellow]{escape(note)}[/]")
            taken = since is None or (snap.submitted_at is not None and snap.submitted_at >= since)
            ended = snap.state.ended and taken and believed.is_current(snap)
            gone = None if ended else watch.gone()
            bar.show(snap, watch.waiting if gone else waiting_note(snap, client))
            if ended:
                # A broker came back and ended the study between two reads: say it came back.
                if waiting_for_broker and watch.gone() is None:
                    console.print(watch.change(waiting=False), markup=False, highlight=False)
                break
            if gone is not None and not wait_for_broker:
                console.print(f"[red]{escape(watch.no_more(snap))}[/]")
                return EXIT_NO_BROKER
            if (gone is not None) != waiting_for_broker:  # say when it starts and ends
                waiting_for_broker = gone is not None
                console.print(watch.change(waiting=gone is not None), markup=False, highlight=False)
            if deadline is not None and time.monotonic() >= deadline:
                console.print(f"[red]timeout:[/] study {name!r} is still {snap.state.value}")
                return 1
            time.sleep(0.2)
    why = snap.outcome()
    if why is None:
        # A stop condition that ended it is a success: said on the same line, not as an error.
        stopped = f" ({snap.stopped})" if snap.stopped else ""
        console.print(
            f"study {name!r} finished: {snap.done} trials, {best_summary(snap)}{stopped}",
            markup=False,
            highlight=False,
        )
        if snap.error:  # a resubmission the broker could not run
            console.print(f"[red]{escape(snap.error)}[/]")
            return 1
        return 0
    console.print(f"[red]study {name!r} {escape(why)}[/]")
    return 1


class _Bar(Progress):
    """The progress bar, two columns short of a terminal's width: the terminal echoes Ctrl-C
    as `^C` after the bar, and on a line that filled the width that wraps, so that the bar's
    last redraw lands on the next line and the bar shows twice."""

    def get_renderable(self) -> RenderableType:
        live = getattr(self, "live", None)  # None while Progress.__init__ builds it
        if live is None or not live.console.is_terminal:
            return super().get_renderable()
        return Constrain(super().get_renderable(), width=live.console.width - 2)


class BrokerWatch:
    """Whether a follower should give up on the prefix's broker. `gone()` reads the broker's
    liveness, and returns what was read once the follower should give up, else None.

    Once it has seen a broker serve the prefix, it gives up when none has turned for `grace_s`
    (by the Redis server's clock): a brief freeze, a slow turn or a quick restart rides it out.
    Until then, no broker may have started yet (it was launched with the submission, or just
    before it, while the previous broker's last turn is long past): it gives up after
    `start_grace_s` by its own clock since `since` (default: its first look)."""

    def __init__(
        self,
        client: BrokerClient,
        *,
        grace_s: float = BROKER_GRACE_S,
        start_grace_s: float | None = None,
        since: float | None = None,
    ) -> None:
        self.client = client
        self.grace_s = grace_s
        self.start_grace_s = (
            liveness.BROKER_START_GRACE_S if start_grace_s is None else start_grace_s
        )
        self.since = since
        self.seen_serving = False
        self.last: BrokerLiveness | None = None

    def gone(self) -> BrokerLiveness | None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
        live = self.last = self.client.liveness(grace_s=self.grace_s)
        if live.serves:
            self.seen_serving = True
            return None
        if live.state is not BrokerState.NONE and (live.last_turn_age_s or 0.0) < self.grace_s:
            return None  # it stopped within the grace: a restart may take its place
        if self.seen_serving or now - self.since >= self.start_grace_s:
            return live
        return None

    waiting = "waiting for a broker"
    """What the bar shows while no broker serves the prefix."""

    def no_more(self, snap: StudyStatus) -> str:
        """Why the follower gives up (what `gone` last read), and what to do."""
        assert self.last is not None  # `gone` read it
        return _no_broker(self.last, snap)

    def change(self, *, waiting: bool) -> str:
        """What `--wait-for-broker` prints when it starts `waiting` for a broker, or stops."""
        return _broker_change(self.last if waiting else None, self)


class DriverWatch:
    """Whether a follower of a study a remote Optimizer runs should give up on that process:
    `gone()` returns its liveness once it has not turned for `grace_s` (by the Redis server's
    clock), else None. Nothing but an Optimizer's process moves such a study: once it is gone
    (killed, or its machine lost), no broker will."""

    waiting = "waiting for its Optimizer"

    def __init__(
        self, client: BrokerClient, believed: _Believed, *, grace_s: float = BROKER_GRACE_S
    ) -> None:
        self.client = client
        self.believed = believed
        self.grace_s = grace_s
        self.last: DriverLiveness | None = None

    def gone(self) -> DriverLiveness | None:
        snap = self.believed.last
        live = judge_driver(
            snap, now_s=server_clock_s(self.client.connection), grace_s=self.grace_s
        )
        if live is None:  # no longer a driven study's status
            return None
        self.last = live
        return None if live.alive else live

    def no_more(self, snap: StudyStatus) -> str:
        """Why the follower gives up (what `gone` last read), and what to do."""
        gone = "its Optimizer stopped" if self.last is None else self.last.describe()
        return (
            f"{gone}; study {snap.name!r} is still {snap.state.value}, and nothing moves it "
            "until an Optimizer runs it again (--wait-for-broker waits for one)"
        )

    def change(self, *, waiting: bool) -> str:
        """What `--wait-for-broker` prints when it starts `waiting` for the study's Optimizer,
        or stops."""
        name = self.believed.name
        now = "" if self.last is None else f": {self.last.describe()}"
        if not waiting:
            return f"an Optimizer runs study {name!r} again{now}"
        return f"waiting for an Optimizer to run study {name!r}{now}"


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


def _no_broker(gone: BrokerLiveness, snap: StudyStatus) -> str:
    """Why a follower gives up: no broker, and what to do."""
    if gone.state is BrokerState.NONE:
        return (
            f"{gone.describe()} (study {snap.name!r} is {snap.state.value}; "
            "--wait-for-broker waits for one)"
        )
    return (
        f"no broker: {gone.describe()}; study {snap.name!r} is still {snap.state.value}, and "
        f"nothing moves it until a broker runs on prefix {gone.prefix!r}: start one with "
        "`optuna-rq broker` (--wait-for-broker waits for one)"
    )


def _broker_change(gone: BrokerLiveness | None, watch: BrokerWatch) -> str:
    """The line `--wait-for-broker` prints when it starts waiting for a broker, or stops."""
    if gone is None:
        back = "" if watch.last is None else f": {watch.last.describe()}"
        return f"a broker serves prefix {watch.client.prefix!r} again{back}"
    if gone.state is BrokerState.NONE:
        return f"waiting for a broker: {gone.describe()}"
    return f"waiting for a broker on prefix {gone.prefix!r}: {gone.describe()}"


def _first_believed(client: BrokerClient, name: str, queued: StudyStatus | None) -> _Believed:
    """What a follower starts from: the study's status; with signing on, the submission's
    `queued` snapshot when it follows its own (the broker's status comes once it took it), or
    the broker's spec of the study as queued when its status is refused (a running study's,
    rewritten). A refused status of a study the broker does not hold is an error."""
    if queued is not None and client.signer.enabled:
        return _Believed(client, name, queued, seen=False)
    try:
        return _Believed(client, name, client.require_status(name), seen=True)
    except ProtocolError:
        held = client.stored_spec(name) if client.signer.enabled else None
        if held is None:
            raise  # nothing but the refused status says there is such a study
        return _Believed(client, name, queued_status(held), seen=True)


class _Believed:
    """What a follower believes of a study: the last status the broker wrote (`first` until it
    reads one: the study's status, or the submission's `queued` snapshot), and what it ignored
    since, said once each (`notes`)."""

    def __init__(self, client: BrokerClient, name: str, first: StudyStatus, *, seen: bool) -> None:
        self.client = client
        self.name = name
        self.last = first
        self.seen = seen  # a status was read: if none is stored any more, the study vanished
        # A driven study's run the follower started on: an ended status of an earlier run (its
        # Optimizer's signed word, kept and written back) is not the end of this one.
        self.driven_since = first.submitted_at if first.driven else None
        self._pending: list[str] = []
        self._said: set[str] = set()

    def read(self) -> StudyStatus:
        """The study's status now; the last one believed if what is stored is refused, or if
        there is none yet (a submission the broker has not taken). ConfigError if it vanished."""
        try:
            status = self.client.status(self.name)
        except ProtocolError as exc:
            self._say("refused", f"ignoring the status of study {self.name!r}: {exc}")
            return self.last
        if status is None:
            if self.seen:
                prefix = self.client.prefix
                raise ConfigError(f"study {self.name!r} vanished from prefix {prefix!r}")
            return self.last
        self.seen = True
        self.last = status
        return status

    def is_current(self, snap: StudyStatus) -> bool:
        """Whether ended `snap` is of the submission the broker holds (`is_current`); for a
        study a remote Optimizer runs, of its run the follower started on, or a later one."""
        if snap.driven:
            since = self.driven_since
            if since is None or (snap.submitted_at or 0.0) >= since:
                return True
        elif self.client.is_current(snap):
            return True
        self._say(
            "earlier",
            f"ignoring the status of study {self.name!r}: it says {snap.state.value}, but of "
            "another submission than the one the broker holds (an earlier run's, written back?)",
        )
        return False

    def notes(self) -> list[str]:
        pending, self._pending = self._pending, []
        return pending

    def _say(self, kind: str, note: str) -> None:
        if kind not in self._said:
            self._said.add(kind)
            self._pending.append(note + "; waiting for the broker's own")


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
