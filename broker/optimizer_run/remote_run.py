"""A remote `Optimizer` run: its trials dispatched to workers from a thread of the caller's
process, its study's status published on the prefix (`run_status`), its progress on the caller's
terminal, and a warning when no worker serves its queue.

Imported when a remote run starts: `import optuna_rq` stays light.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import optuna
import redis

from optuna_rq.dispatch import Budget, Dispatcher, RunSpec, StudyRun
from optuna_rq.dispatch.publication import TrialPublication
from optuna_rq.optimizer_run.run_status import DrivenStatus
from optuna_rq.plumbing.connection import connect, resolve_redis_password
from optuna_rq.plumbing.locations import DEFAULT_PREFIX
from optuna_rq.protocol import (
    DEFAULT_QUEUE,
    Keys,
    Role,
    Signer,
    StudyState,
    StudyStatus,
    describe_exception,
    live_pools,
    workers_on,
)
from optuna_rq.study.optuna_trials import optimize_loop, stop_requested

__all__ = ["UNSERVED_WARNING_S", "RemoteRun", "run_on_workers"]

log = logging.getLogger("optuna_rq.optimizer")

UNSERVED_WARNING_S = 3.0
"""How soon a remote Optimizer whose queue has no live worker says so (and then how often)."""


@dataclass(frozen=True)
class RemoteRun:
    """What a remote run takes from its `Optimizer`: the study, where its trials go, and the
    Optimizer's own step after each trial is recorded (its callbacks, its stop conditions)."""

    study: optuna.Study
    objective_path: str
    concurrency: int
    n_trials: int
    connection: redis.Redis | None
    redis_url: str | None
    prefix: str | None
    queue: str | None
    trial_timeout: int | None
    max_retries: int
    progress: bool | None
    after_tell: Callable[[optuna.Study, int], None]


async def run_on_workers(remote: RemoteRun, inputs: dict[str, Any]) -> None:
    """Dispatch `remote`'s trials to workers from a thread; cancelling the await stops the
    run and ends the outstanding trials FAIL (`cancelled`), so none is left RUNNING. The study's
    status is published from the start (StudyConflictError, nothing sent, if the broker holds a
    study of its name) to the end: finished, cancelled, or failed with what the run raises."""
    study = remote.study
    connection = remote.connection or connect(
        remote.redis_url or "", password=resolve_redis_password()
    )
    prefix = remote.prefix or DEFAULT_PREFIX
    run = StudyRun(
        study=study,
        spec=RunSpec(
            objective=remote.objective_path,
            inputs=inputs,
            concurrency=remote.concurrency,
            trial_timeout_s=remote.trial_timeout,
            max_retries=remote.max_retries,
            queue=remote.queue or DEFAULT_QUEUE,
        ),
        budget=Budget(remote.n_trials),
    )
    signer = Signer.from_env(Role.CLIENT)
    keys = Keys(prefix)
    published = DrivenStatus(connection, keys, signer, run=run)
    published.claim()  # before anything is sent: the name may be the broker's
    # Its trials are published as the broker publishes its studies' (`optuna-rq trials`), under
    # the study's name: those it has from earlier runs now, then each as it is sent and as it ends.
    trials = TrialPublication(keys, signer, driven=True)
    trials.reconcile(connection, study)
    dispatcher = Dispatcher(
        connection,
        prefix=prefix,
        reply_to=keys.private_results(uuid.uuid4().hex),
        signer=signer,
        publication=trials,
    )
    dispatcher.add(run)
    stop = threading.Event()
    failures: list[BaseException] = []

    def after_tell(run: StudyRun, number: int) -> None:
        published.mark()
        if failures:
            return
        try:
            remote.after_tell(run.study, number)
        except Exception as exc:  # end the run cleanly, then raise it from the run
            failures.append(exc)
            stop.set()
            return
        if stop_requested(run.study):
            dispatcher.endings.wind_down(run, "study.stop() was called before this trial was sent")

    def work_until_done() -> None:
        with optimize_loop(study):  # in the dispatcher's thread: callbacks run there
            dispatcher.run_until_done(stop)

    dispatcher.on_told = after_tell
    dispatcher.on_turn = published.turn
    with _progress_bar(remote.progress, run.name) as show:
        published.on_status = show
        assert published.latest is not None  # claimed
        show(published.latest)
        watch = threading.Thread(
            target=_warn_while_unserved,
            args=(dispatcher, run, stop),
            name="optuna-rq-worker-watch",
            daemon=True,
        )
        watch.start()
        work = asyncio.get_running_loop().run_in_executor(None, work_until_done)
        ended, error = StudyState.FINISHED, None
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            ended, error = StudyState.CANCELLED, "the Optimizer's run was cancelled"
            stop.set()
            await work  # the loop ends the outstanding trials, then returns
            raise
        except BaseException as exc:  # a study fault, Redis gone for good: the run raises it
            ended, error = StudyState.FAILED, describe_exception(exc)
            raise
        finally:
            stop.set()
            if failures:
                ended, error = StudyState.FAILED, describe_exception(failures[0])
            published.end(ended, error)
            dispatcher.close()
    if failures:
        raise failures[0]


@contextlib.contextmanager
def _progress_bar(wanted: bool | None, name: str) -> Iterator[Any]:
    """What shows a status on the caller's stderr as a progress bar (`study_bar.StudyBar`), or
    does nothing: on when stderr is a terminal (`wanted` None), or as `wanted` says."""
    if wanted is None:
        wanted = sys.stderr.isatty()
    if not wanted:
        yield _show_nothing
        return
    from optuna_rq.terminal.status_view import waiting_note
    from optuna_rq.terminal.study_bar import StudyBar, make_console

    with StudyBar(make_console(stderr=True), name) as bar:

        def show(status: StudyStatus) -> None:
            bar.show(status, waiting_note(status, None))

        yield show


def _show_nothing(status: StudyStatus) -> None:
    """No progress bar."""


def _warn_while_unserved(dispatcher: Any, run: Any, stop: threading.Event) -> None:
    """Log, every `UNSERVED_WARNING_S` while the run goes on, that no live worker serves its
    queue and what it waits for: otherwise a run without workers waits silently forever. Live
    workers are the pools' own heartbeats, as the broker counts them; the study's status says
    it waits for one while none does (`StudyStatus.waiting_for_workers`)."""
    module = run.spec.objective.partition(":")[0]
    rq_queue = dispatcher.keys.trial_queue(module, run.spec.queue)
    while not stop.wait(UNSERVED_WARNING_S):
        if run.done:
            return
        try:
            live = workers_on(
                live_pools(dispatcher.connection, dispatcher.keys, dispatcher.signer), rq_queue
            )
        except Exception:  # Redis away: the dispatcher rides it out and says so itself
            continue
        run.note_workers(live == 0)
        if live == 0:
            log.warning(
                "study %r: waiting for a worker on queue %r (%d trials outstanding, %d of %d "
                "asked); start one with `optuna-rq workers --import %s --queue %s`",
                run.name,
                rq_queue,
                run.n_outstanding,
                run.budget.asked,
                run.budget.n_trials,
                module,
                run.spec.queue,
            )
