"""Which outstanding attempts have lost their worker, judged by their leases.

A worker holds a lease (`Keys.lease`) from the moment it starts an attempt until
its result is in the stream. An attempt is lost when:

- its lease was seen and is now gone: the worker stopped renewing it (killed, frozen, cut off);
- its RQ job ended (failed, stopped, or gone) and no lease is held: it ended without a result
  (a request that did not decode, a job RQ itself gave up on);
- its RQ job is marked started, or sits in the queue's intermediate list (where RQ moves a job
  it dequeues, until the worker marks it started), but no lease appeared within `grace_s`: the
  worker died between taking the job and taking the lease. RQ itself notices such a job only
  after a minute, and only when some worker's maintenance pass comes round.

A job still in the queue has no lease yet and is not lost, however long it waits. Nor is a trial
waiting in a batch (a job carrying several: `Keys.batch_job_id`) while a trial before it in the
same job holds its lease: its worker leases each trial as it starts it, one after another. The
caller
reads the result stream after `check` and before failing anything it returned: a result that
arrived just before its lease went is then recorded, not lost.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis
from rq.job import Job

__all__ = ["LeaseWatch", "Watched"]

_WAITING = {b"queued", b"deferred", b"scheduled", b"created"}
_STARTED = b"started"
_LAPSED = "its worker stopped renewing the lease (killed, frozen, or cut off from Redis)"


@dataclass(frozen=True)
class Watched:
    """One outstanding attempt: the id of the RQ job carrying it (a batch's may carry others), its
    lease key, and its queue's intermediate list (None: the watch's own)."""

    job_id: str
    lease: str
    intermediate: str | None = None


@dataclass
class _Seen:
    lease_seen: bool = False
    missing_since: float | None = None  # started, never leased: since when (monotonic)


class LeaseWatch:
    """Tracks what it has seen of each attempt's lease across calls to `check`."""

    def __init__(self, connection: redis.Redis, *, intermediate_key: str, grace_s: float) -> None:
        self.connection = connection
        self.intermediate_key = intermediate_key  # the queue's list of dequeued, unstarted jobs
        self.grace_s = grace_s
        self._seen: dict[str, _Seen] = {}

    def forget(self, lease: str) -> None:
        self._seen.pop(lease, None)

    def reset(self) -> None:
        """Forget every lease seen: after a Redis outage leases may have lapsed while their
        workers were fine, so each gets `grace_s` to be renewed before it counts as lost."""
        self._seen.clear()

    def check(self, attempts: Iterable[Watched]) -> list[tuple[Watched, str]]:
        """The attempts that look lost now, each with why (at most two round trips)."""
        watched = list(attempts)
        if not watched:
            return []
        leases = self.connection.mget([w.lease for w in watched])
        running = {w.job_id for w, lease in zip(watched, leases, strict=True) if lease is not None}
        missing: list[Watched] = []
        for attempt, lease in zip(watched, leases, strict=True):
            seen = self._seen.setdefault(attempt.lease, _Seen())
            if lease is not None:
                seen.lease_seen, seen.missing_since = True, None
            elif not seen.lease_seen and attempt.job_id in running:
                seen.missing_since = None  # waiting in its batch behind the trial running
            else:
                missing.append(attempt)
        if not missing:
            return []
        lists = sorted({a.intermediate or self.intermediate_key for a in missing})
        pipe = self.connection.pipeline(transaction=False)
        for key in lists:
            pipe.lrange(key, 0, -1)
        for attempt in missing:
            pipe.hget(Job.key_for(attempt.job_id), "status")
        replies = pipe.execute()
        taken, statuses = replies[: len(lists)], replies[len(lists) :]
        dequeued = {bytes(job_id).decode() for ids in taken for job_id in ids}
        now = time.monotonic()
        lost: list[tuple[Watched, str]] = []
        for attempt, status in zip(missing, statuses, strict=True):
            seen = self._seen[attempt.lease]
            if status in _WAITING and attempt.job_id in dequeued:
                status = _STARTED  # taken from the queue by a worker: it should lease it now
            if status in _WAITING:
                seen.missing_since = None
            elif seen.lease_seen:
                lost.append((attempt, _LAPSED))
            elif status != _STARTED:
                state = "is gone" if status is None else f"is {status.decode(errors='replace')}"
                lost.append((attempt, f"its RQ job {state} and no result came (see worker logs)"))
            elif seen.missing_since is None:
                seen.missing_since = now
            elif now - seen.missing_since >= self.grace_s:
                lost.append((attempt, f"its worker took the job but no lease in {self.grace_s:g}s"))
        return lost
