"""Following a study on a terminal until it ends (`follow`, `follow_study`): the progress of
`wait`, `submit --wait` and `demo`, drawn with the bar of `study_bar`, watching what
`follow_watches` watches to know when to give up, in the words of `status_view`.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.markup import escape

from optuna_rq.client import BrokerClient, queued_status
from optuna_rq.protocol import StudySpec, StudyStatus
from optuna_rq.terminal.believed_status import first_believed
from optuna_rq.terminal.follow_watches import BrokerWatch, DriverWatch
from optuna_rq.terminal.status_view import (
    best_summary,
    waiting_note,
)
from optuna_rq.terminal.study_bar import StudyBar, make_console

__all__ = ["EXIT_INTERRUPTED", "EXIT_NO_BROKER", "follow", "follow_study"]

EXIT_NO_BROKER = 3
"""What `wait` and `submit --wait` exit with when no broker serves the prefix (`BrokerWatch`:
the broker died or stopped, or none started), or, for a study a remote Optimizer runs, when its
process stopped turning (`DriverWatch`), unless `--wait-for-broker`."""

EXIT_INTERRUPTED = 130
"""What a command stopped by Ctrl-C exits with (128 + SIGINT, as a shell reports it)."""


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
    ignored, reported once, and the last status believed stays; if it is the first one read, and
    the broker holds no study of that name, it is an error (ProtocolError, exit 1). An ended
    one of another submission than the broker holds is not the end either
    (`BrokerClient.is_current`). `queued` (the submission's `queued_status`) shows until the
    broker's first status comes: with signing on, a front door writes none of its own."""
    console = console or make_console(stderr=True)
    believed = first_believed(client, name, queued)
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
        # A stop condition that ended it is a success: reported on the same line, not as an error.
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
