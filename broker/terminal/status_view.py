"""How a study's status reads on a terminal: the lines of `optuna-rq status`, its detail for one
study, and the words the progress bar shows beside the budget (`study_bar`).

A study a remote Optimizer runs is marked with its process (`running (optimizer host:pid)`) and
judged by its turns, never by the prefix's broker, which does not run it.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from optuna_rq.protocol import StudyStatus
from optuna_rq.protocol.choices import Direction, StrChoice
from optuna_rq.protocol.liveness import BrokerLiveness, ago, judge_driver
from optuna_rq.protocol.status import RefusedStatus

if TYPE_CHECKING:
    from optuna_rq.client import BrokerClient

__all__ = [
    "REFUSED",
    "ShownState",
    "beside",
    "best_summary",
    "status_detail",
    "status_lines",
    "waiting_note",
]


def beside(snap: StudyStatus) -> str:
    """What the bar shows beside the budget: retries, failures by reason, and a stop condition
    that holds while the last trials finish."""
    parts = [f"retries {snap.retries}"] if snap.retries else []
    if snap.stopped and not snap.state.ended:
        parts.append(f"stopping: {snap.stopped}")
    failures = ", ".join(f"{k} {v}" for k, v in sorted(snap.fail_reasons.items()))
    if failures:
        parts.append(f"failed: {failures}")
    return "  ".join(parts)


def waiting_note(snap: StudyStatus, client: BrokerClient | None) -> str:
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
    and none serving, a queued or running study's state reads `running (no broker)`. A study a
    remote Optimizer runs reads `running (optimizer host:pid)` (`_state`). A refused status
    (not the broker's) reads `refused`, and nothing of it is shown."""
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
    serves the prefix (`short`: `(no broker)`). A study a remote Optimizer runs is marked with
    its process, `running (optimizer host:pid)`, and whether that process still turns (read
    by the Redis clock of `broker`): `running (optimizer host:pid, gone)`; in full, `running
    (the Optimizer on host:pid stopped 40s ago)`."""
    if s.driver is not None:
        live = None
        if broker is not None and broker.read_at_s is not None and not s.state.ended:
            live = judge_driver(s, now_s=broker.read_at_s)
        if not short:
            marker = live.describe() if live is not None else f"run by the Optimizer on {s.driver}"
        else:
            marker = f"optimizer {s.driver}" + (", gone" if live and not live.alive else "")
        return f"{s.state.value} ({marker})"
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
        f"concurrency  {s.concurrency}, priority {s.priority:g}"
        + (f", batches of {s.batch}" if s.batch > 1 else ""),
        f"best         {best_summary(s).removeprefix('best ')}",
    ]
    waiting = waiting_note(s, client)
    if waiting:
        lines.insert(2, waiting.replace("worker: ", "worker, start one: ", 1))
    if not s.multi_objective:
        lines.append(f"best params  {s.best_params!r}" if s.best_params else "best params  -")
    if s.driver is not None:
        lines.insert(2, f"driven by    the Optimizer on {s.driver} (a Python process, no broker)")
        kept = s.storage or "the Optimizer's study (in its process)"
        lines.append(f"storage      {kept}")
    else:
        lines.append(f"storage      {s.storage or 'the broker default (not taken yet)'}")
    if s.submitted_at is not None:
        submitted = datetime.fromtimestamp(s.submitted_at, timezone.utc).isoformat()
        lines.append(f"submitted    {submitted} ({_age(s)} ago)")
    lines.append(f"updated      {s.updated_at}")
    return lines
