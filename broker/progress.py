"""A study's published status on a terminal: the lines of `status`, its detail for one study,
and the progress bar of `wait`, `submit --wait` and `demo`.

Output that is not a terminal is never wrapped nor cut (a command printed for copying stays one
line), and log records emitted while a bar is live are printed above it instead of through it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from datetime import datetime, timezone

from rich.console import Console, RenderableType
from rich.constrain import Constrain
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from optuna_rq.client import BrokerClient, queued_status
from optuna_rq.errors import ConfigError, ProtocolError
from optuna_rq.protocol import StudyStatus, liveness
from optuna_rq.protocol.choices import Direction, StrChoice
from optuna_rq.protocol.liveness import BROKER_GRACE_S, BrokerLiveness, BrokerState, ago
from optuna_rq.protocol.status import RefusedStatus

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_NO_BROKER",
    "REFUSED",
    "BrokerWatch",
    "ShownState",
    "best_summary",
    "follow_study",
    "make_console",
    "status_detail",
    "status_lines",
]

EXIT_NO_BROKER = 3
"""What `wait` and `submit --wait` exit with when no broker serves the prefix (`BrokerWatch`:
the broker died or stopped, or none started), unless `--wait-for-broker`."""

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
    trial; `EXIT_NO_BROKER` once no broker serves the prefix (`BrokerWatch`; with
    `wait_for_broker`: it says so, and waits on for one); else 1. A line says why.

    Only a status the broker wrote counts (`BrokerClient.status`): one it did not sign is
    ignored, said once, and the last status believed stays; if it is the first one read, and
    the broker holds no study of that name, it is an error (ProtocolError, exit 1). An ended
    one of another submission than the broker holds is not the end either
    (`BrokerClient.is_current`). `queued` (the submission's `queued_status`) shows until the
    broker's first status comes: with signing on, a front door writes none of its own."""
    console = console or make_console(stderr=True)
    believed = _first_believed(client, name, queued)
    watch = BrokerWatch(client)
    waiting_for_broker = False
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[best]}  {task.fields[failures]}"),
        TimeElapsedColumn(),
    )
    with _logs_above(console), _Bar(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(name, total=None, best="", failures="")
        while True:
            snap = believed.read()
            for note in believed.notes():
                console.print(f"[yellow]{escape(note)}[/]")
            taken = since is None or (snap.submitted_at is not None and snap.submitted_at >= since)
            ended = snap.state.ended and taken and believed.is_current(snap)
            gone = None if ended else watch.gone()
            waiting_note = "waiting for a broker" if gone else _waiting_note(snap, client)
            progress.update(
                bar,
                total=snap.n_trials,
                completed=min(snap.done, snap.n_trials),
                best=escape(best_summary(snap)),
                failures=escape("  ".join(filter(None, (_beside(snap), waiting_note)))),
            )
            if ended:
                # A broker came back and ended the study between two reads: say it came back.
                if waiting_for_broker and watch.gone() is None:
                    console.print(_broker_change(None, watch), markup=False, highlight=False)
                break
            if gone is not None and not wait_for_broker:
                console.print(f"[red]{escape(_no_broker(gone, snap))}[/]")
                return EXIT_NO_BROKER
            if (gone is not None) != waiting_for_broker:  # say when it starts and ends
                waiting_for_broker = gone is not None
                console.print(_broker_change(gone, watch), markup=False, highlight=False)
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


def _beside(snap: StudyStatus) -> str:
    """What the bar shows beside the budget: retries, failures by reason, and a stop condition
    that holds while the last trials finish."""
    parts = [f"retries {snap.retries}"] if snap.retries else []
    if snap.stopped and not snap.state.ended:
        parts.append(f"stopping: {snap.stopped}")
    failures = ", ".join(f"{k} {v}" for k, v in sorted(snap.fail_reasons.items()))
    if failures:
        parts.append(f"failed: {failures}")
    return "  ".join(parts)


def _waiting_note(snap: StudyStatus, client: BrokerClient | None) -> str:
    """What a study with no live worker on its queue waits for, how to start one, and what the
    live workers of its resource class serve instead (a misspelt module shows here)."""
    if not snap.waiting_for_workers or snap.state.ended:
        return ""
    served = [] if client is None else client.served_modules(snap.queue)
    elsewhere = f" (live workers on queue {snap.queue!r} serve {', '.join(served)})"
    return f"waiting for a worker: {_worker_command(snap)}" + (elsewhere if served else "")


def _worker_command(snap: StudyStatus) -> str:
    """The command that starts a worker for the study's trials."""
    module = snap.objective.partition(":")[0]
    queue = "" if snap.queue == "default" else f" --queue {snap.queue}"
    return f"optuna-rq workers --import {module}{queue}"


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
        """Whether ended `snap` is of the submission the broker holds (`is_current`)."""
        if self.client.is_current(snap):
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


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else f"{value:.6g}"


def best_summary(snap: StudyStatus) -> str:
    """`best 0.123`; a multi-objective study: `pareto 3, best 0.1 / 4.2` (each objective's
    best over the front, by its direction)."""
    if not snap.multi_objective:
        return f"best {_number(snap.best_value)}"
    front = snap.best_values or []
    if not front:
        return "pareto 0"
    bests = []
    for i, direction in enumerate(snap.directions):
        column = [point[i] for point in front if i < len(point)]
        pick = max if direction == Direction.MAXIMIZE else min
        bests.append(_number(pick(column)) if column else "-")
    return f"pareto {len(front)}, best {' / '.join(bests)}"


def _age(s: StudyStatus, now_s: float | None = None) -> str:
    """How long ago the study was submitted (its last submission: a resubmission starts it
    again), `3m`; a snapshot without `submitted_at` (written before it was published) falls
    back to its last update."""
    then = s.submitted_at
    if then is None:
        try:
            then = datetime.fromisoformat(s.updated_at).timestamp()
        except ValueError:
            return "?"
    return ago((time.time() if now_s is None else now_s) - then)


_HEADER = ("STUDY", "STATE", "DONE", "RUNNING", "FAILED", "BEST", "AGE")


class ShownState(StrChoice):
    """The states `status` shows (and `status --state` picks): a study's (`StudyState`), or
    `refused` for one whose stored status is refused (`RefusedStatus`)."""

    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"
    REFUSED = "refused"


REFUSED = str(ShownState.REFUSED)
"""The state `status` shows for a study whose stored status is refused (`RefusedStatus`)."""


def status_lines(
    snapshots: list[StudyStatus | RefusedStatus],
    *,
    now_s: float | None = None,
    broker: BrokerLiveness | None = None,
) -> list[str]:
    """A header and one aligned line per study: name, state, done/budget, running, failed, best
    (a multi-objective study's Pareto size and per-objective bests), and its age: the time
    since it was submitted (`submitted_at`), not since its status last changed. With `broker`
    and none serving, a queued or running study's state reads `running (no broker)`. A refused
    status (not the broker's) reads `refused`, and nothing of it is shown."""
    rows = [_HEADER] + [
        (
            (s.name, REFUSED, "-", "-", "-", "-", "-")
            if isinstance(s, RefusedStatus)
            else (
                s.name,
                _state(s, broker, short=True),
                f"{s.done}/{s.n_trials}",
                str(s.running),
                str(s.failed),
                best_summary(s).removeprefix("best "),
                _age(s, now_s),
            )
        )
        for s in snapshots
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def _state(s: StudyStatus, broker: BrokerLiveness | None, *, short: bool = False) -> str:
    """The study's state, with `(no broker: ...)` if it is queued or running and no broker
    serves the prefix (`short`: `(no broker)`)."""
    note = None if broker is None or s.state.ended else broker.note()
    if note is None:
        return s.state.value
    return f"{s.state.value} ({'no broker' if short else note})"


def status_detail(
    s: StudyStatus, client: BrokerClient | None = None, broker: BrokerLiveness | None = None
) -> list[str]:
    """One study in full: `label: value` lines (with `client`, a study waiting for a worker
    also says what the live workers serve; with `broker`, a queued or running study's state
    says if no broker serves the prefix: `running (no broker: the broker on h:12 stopped 40s
    ago)`)."""
    reasons = ", ".join(f"{k}: {v}" for k, v in s.fail_reasons.items()) or "-"
    lines = [
        f"study        {s.name}",
        f"state        {_state(s, broker)}" + (f" ({s.error})" if s.error else ""),
        *([f"stopped      {s.stopped}"] if s.stopped else []),
        f"objective    {s.objective}",
        f"queue        {s.queue}",
        f"directions   {', '.join(s.directions)}",
        f"trials       {s.done}/{s.n_trials} done, {s.running} running"
        + (f", {s.retries} retries" if s.retries else ""),
        f"outcomes     {s.complete} complete, {s.pruned} pruned, {s.failed} failed",
        f"fail reasons {reasons}",
        *([f"last error   {s.last_error}"] if s.last_error else []),
        f"concurrency  {s.concurrency}, priority {s.priority:g}",
        f"best         {best_summary(s).removeprefix('best ')}",
    ]
    waiting = _waiting_note(s, client)
    if waiting:
        lines.insert(2, waiting.replace("worker: ", "worker, start one: ", 1))
    if not s.multi_objective:
        lines.append(f"best params  {s.best_params!r}" if s.best_params else "best params  -")
    lines.append(f"storage      {s.storage or 'the broker default (not taken yet)'}")
    if s.submitted_at is not None:
        submitted = datetime.fromtimestamp(s.submitted_at, timezone.utc).isoformat()
        lines.append(f"submitted    {submitted} ({_age(s)} ago)")
    lines.append(f"updated      {s.updated_at}")
    return lines
