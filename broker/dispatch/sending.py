"""The trial queue: sealed requests built from sampled params, and their RQ jobs.

A request is the study's inputs with every suggestion sampled by `process` on the trial (a trial
that already has its params, after a restart, gets the same ones), signed. Its job's id names the
study, its incarnation, the trial and the attempt (`Keys.job_id`), so a job is found again after
a restart, a retry never collides with the attempt it replaces, and nothing of an earlier study
of the same name (a cancel mark) is taken for it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from copy import deepcopy
from typing import Any

import optuna
import redis
from optuna.distributions import distribution_to_json
from rq import Queue
from rq.job import Job

from optuna_rq.dispatch.runs import InFlight, StudyRun
from optuna_rq.errors import MessageLimitError
from optuna_rq.protocol import (
    CANCEL_TTL_S,
    RUN_TRIAL,
    Keys,
    Record,
    RelativeView,
    Signer,
    TrialRequest,
    trial_queue,
)
from optuna_rq.space.declarations import process
from optuna_rq.study.optuna_trials import relative_view

__all__ = ["FINISHED_JOB_TTL_S", "FAILED_JOB_TTL_S", "TrialSender"]

FINISHED_JOB_TTL_S = 10
"""How long RQ keeps a trial's job once it finished (the result itself is in the stream)."""
FAILED_JOB_TTL_S = 24 * 3600
"""How long RQ keeps a trial's job that failed (for `rq info` and the worker logs)."""


class TrialSender:
    """Builds the requests of one dispatcher's trials and enqueues each run's jobs on its queue:
    `Keys.trial_queue(run.module, run.spec.queue)`, the one only workers serving the module (in the
    run's resource class) listen to."""

    def __init__(
        self, connection: redis.Redis, *, keys: Keys, reply_to: str, signer: Signer
    ) -> None:
        self.connection = connection
        self.keys = keys
        self.reply_to = reply_to
        self.signer = signer
        self._queues: dict[str, Queue] = {}

    def queue_name(self, run: StudyRun) -> str:
        return self.keys.trial_queue(run.module, run.spec.queue)

    def queue(self, run: StudyRun) -> Queue:
        """The RQ queue `run`'s trials go to."""
        name = self.queue_name(run)
        if name not in self._queues:
            self._queues[name] = trial_queue(self.connection, name)
        return self._queues[name]

    def intermediate_key(self, run: StudyRun) -> str:
        """Where RQ keeps `run`'s jobs a worker dequeued and has not yet marked started."""
        return str(self.queue(run).intermediate_queue_key)

    def depth(self, runs: Iterable[StudyRun]) -> int:
        """Jobs waiting on the queues of `runs` (one round trip)."""
        queue_keys = sorted({self.queue(run).key for run in runs})
        if not queue_keys:
            return 0
        pipe = self.connection.pipeline(transaction=False)
        for key in queue_keys:
            pipe.llen(key)
        return sum(int(n) for n in pipe.execute())

    def job_id(self, run: StudyRun, record: InFlight) -> str:
        return Keys.job_id(run.attempt_id(record, self.reply_to))

    def seal(self, run: StudyRun, record: InFlight) -> bytes:
        """The signed request for `record`, its params sampled now, with the attempt's token
        (its results and calls give it back: `results.issued`). Raises whatever Optuna
        raises when it rejects the space, or ProtocolError for a request too big to send."""
        params = dict(process(record.trial, deepcopy(run.spec.inputs)))
        request = TrialRequest(
            study=run.name,
            incarnation=run.spec.incarnation,
            trial_number=record.number,
            attempt=record.attempt,
            objective=run.spec.objective,
            params=params,
            n_objectives=len(run.study.directions),
            reply_to=self.reply_to,
            token=self.signer.attempt_token(self.job_id(run, record)),
            relative=_relative(record.trial),
        )
        try:
            body = request.encode()
        except MessageLimitError:
            if request.relative is None:
                raise
            # Its suggestions ask the broker instead: a request too big only for what it
            # carries to save round trips is not refused for it.
            body = dataclasses.replace(request, relative=None).encode()
        return self.signer.seal(Record.REQUEST, body)

    def enqueue(
        self, run: StudyRun, batch: Sequence[InFlight], payloads: Sequence[bytes], pipeline: Any
    ) -> str:
        """Enqueue one job carrying the trials of `batch` (their sealed requests `payloads`), run
        in that order, in `pipeline` (None: on its own, now); returns its id."""
        job_id = Keys.batch_job_id([run.attempt_id(record, self.reply_to) for record in batch])
        timeout_s = run.spec.trial_timeout_s  # none with a batch (`StudySpec.batch`)
        numbers = ", ".join(str(record.number) for record in batch)
        self.queue(run).enqueue_call(
            func=RUN_TRIAL,
            args=tuple(payloads),
            job_id=job_id,
            timeout=math.ceil(timeout_s) if timeout_s else -1,
            # Kept briefly once finished (`rq info` shows them): deleting a job at once costs
            # its worker seven more round trips (workers/bookkeeping.py).
            result_ttl=FINISHED_JOB_TTL_S,
            failure_ttl=FAILED_JOB_TTL_S,
            description=f"{run.name} trial{'s' if len(batch) > 1 else ''} {numbers}",
            pipeline=pipeline,
        )
        return job_id

    def jobs_of(self, run: StudyRun, records: Sequence[InFlight]) -> list[str | None]:
        """The id of the job that carries each record's attempt, if one is queued, running, or
        kept after it ended; None where none is (one round trip).

        A trial's own job is found by its id; a trial sent in a batch by the id of a batch job
        waiting on the run's queue, or taken from it (`Keys.carried`). A batch that ended has
        sent its results, or it failed and nothing runs its trials any more."""
        queue = self.queue(run)
        own = [self.job_id(run, record) for record in records]
        pipe = self.connection.pipeline(transaction=True)  # one snapshot of where jobs are
        pipe.lrange(queue.key, 0, -1)
        pipe.lrange(queue.intermediate_queue_key, 0, -1)
        pipe.zrange(queue.started_job_registry.key, 0, -1)
        for job_id in own:
            pipe.exists(Job.key_for(job_id))
        queued, taken, started, *exists = pipe.execute()
        carrier: dict[str, str] = {}
        for entry in [*queued, *taken, *started]:
            job = bytes(entry).decode().split(":", 1)[0]  # a started entry is `job:execution`
            if "_" in job:  # a batch's (a single job's id names only its own attempt)
                for carried in Keys.carried(job):
                    carrier[carried] = job
        return [
            job_id if found else carrier.get(job_id)
            for job_id, found in zip(own, exists, strict=True)
        ]

    def withdraw(self, run: StudyRun, records: Sequence[InFlight]) -> None:
        """Cancel the jobs of `records` that no worker has taken yet, and mark every one
        cancelled (`Keys.cancel`): the worker running it, or taking it in the meantime, stops
        it. The mark is sealed as this dispatcher's, for that attempt (`Record.CANCEL`): with
        signing on, a worker acts on no other (`workers.cancel_marks.CancelMarks`)."""
        if not records:
            return
        queue_key = self.queue(run).key
        withdrawn = {self.job_id(run, record) for record in records}
        # A record not known to be sent may have its own job queued all the same.
        jobs = sorted({record.job or self.job_id(run, record) for record in records})
        pipe = self.connection.pipeline(transaction=False)
        for record in records:
            # Its value says nothing but who set it: `1` without signing.
            job_id = self.job_id(run, record)
            mark = self.signer.seal(Record.CANCEL, b"1", bound_to=job_id)
            pipe.set(Keys.cancel(run.attempt_id(record, self.reply_to)), mark, ex=CANCEL_TTL_S)
        # A job is taken off the queue atomically: a worker dequeues it or we take it back,
        # never both, so no status read can go stale between looking and cancelling. A batch
        # only with every trial it carries: a trial left in it would run on no worker.
        whole = [job for job in jobs if withdrawn.issuperset(Keys.carried(job))]
        for job in whole:
            pipe.lrem(queue_key, 1, job)
        removed = pipe.execute()[len(records) :]
        taken_back = [job for job, count in zip(whole, removed, strict=True) if count]
        if taken_back:  # jobs no worker will see: nothing but their hashes refers to them
            self.connection.delete(*(Job.key_for(j) for j in taken_back))


def _relative(trial: optuna.Trial) -> dict[str, Any] | None:
    """What a request carries of its trial's relative sampling (`RelativeView`); None where it
    would answer nothing on the worker: the sampler was asked already (the study's space was
    sampled here) and gave nothing beyond what is settled."""
    view = relative_view(trial)
    if view is None:
        return None
    asked, space, params, settled = view
    if asked and not set(params) - settled:
        return None
    return RelativeView(
        space={name: distribution_to_json(d) for name, d in space.items()},
        # As the worker gets it back, and the storage keeps it: plain Python values. A param
        # outside the space is Optuna's error to raise, on the broker, at its suggestion.
        params={
            n: space[n].to_external_repr(space[n].to_internal_repr(v))
            for n, v in params.items()
            if n in space
        },
        asked=asked,
        settled=frozenset(settled),
    ).to_wire()
